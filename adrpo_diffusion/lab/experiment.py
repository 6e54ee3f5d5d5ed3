"""The method lab: ADRPO against its baselines on the coloured-shapes task, on a CPU, with the project's trainer.

Every run fine-tunes the same base (``builtin:tiny-sd3-shapes``) with :class:`adrpo_diffusion.trainer.Trainer` on
the compositional ``shapes`` reward (colour, shape, count, position and binding checks, GenEval-like) of the 16
captions of ``prompts/shapes.txt``, with the same compute: ``steps`` iterations of ``prompts_per_step x
images_per_prompt`` sampled images, one optimiser step each, ``timesteps_per_sample`` stratified (noise, t) draws
per image on the sampler's own schedule. Advantage-based methods normalise their advantages by the group's std.

The frontier. Each method runs at three strengths of its own regulariser (:data:`FRONTIER`: ADRPO's and
fixed-beta's beta, ORW-CFM-W2's W2 weight, RAFT's top-k, DPO's beta, DiffusionNFT's and AWM's KL weight), at its
learning rate (:data:`LEARNING_RATES`, or the best on validation seeds of ``learning_rates``, or of its own rate times
each of ``learning_rate_factors``, when given).

Tracking. A run is one ``Trainer`` with a callback (:class:`_Tracker`): every ``eval_every`` steps, right after
that step's checkpoint, and once for the base, :class:`HeldoutProbe` measures the current policy on held-out seeds
(never used in training):

- ``reward``: the mean ``shapes`` score of ``eval_images`` images for each prompt; ``colour``, ``shape``,
  ``count``, ``position``: its checks; ``geneval_pass``: the fraction of images whose every check passes
  (:mod:`adrpo_diffusion.scorers.shapes`), the number GenEval reports.
- ``pixel_diversity``: for each prompt, the mean over pairs of its images of the RMS pixel distance
  ``||x_i - x_j||_2 / sqrt(3 H W)`` (images in ``[0, 1]``), averaged over prompts.
- ``feature_diversity``: the same pairs compared by the cosine distance ``1 - cos`` of :class:`RandomFeatures`,
  a fixed random conv net: it sees colours, edges and their coarse layout, and a shape moved by a pixel or two
  stays close, unlike in pixel space.
- ``w2_divergence``: ``E ||v_theta - v_ref||^2`` (mean over latent elements, as the trainer's ``w2_divergence``)
  between the policy and the base on fixed held-out noisy inputs: the base's own held-out samples ``x1``, fixed
  noise, and ``t`` in {1/8, 3/8, 5/8, 7/8}.
- ``validation_reward``: the same reward on disjoint *validation* seeds. The run's *chosen* checkpoint is the step
  (the base included) with the best validation reward, not the last one: over-optimised runs peak and fall back.

Results: ``results.json`` (every record of every run and seed), ``lab_table.md`` (the held-out values at the
chosen checkpoint, mean +- standard error over seeds, and the reward at matched diversity), PNG plots (reward
against diversity and against W2 divergence along training, learning curves) and sample grids: the same held-out
prompts and noise for the base and each method's best run (``samples_comparison.png``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..callbacks import TrainerCallback
from ..families import check_model_source
from ..seeds import image_generators
from ..settings import ConfigError, arg_parser, load, overrides_from_args
from ..settings import documented as _f
from ..utils import paired_change, umask_permissions

CHECK_NAMES = ("colour", "shape", "count", "position")
NORMALISED = {"advantage_normalization": "group_std"}


def adrpo_options(beta0: float, clip: float = 1.0) -> dict:
    """ADRPO's method_options with advantages clipped to ``[-clip * beta0, clip * beta0]``."""
    return {"beta0": beta0, "advantage_min": -clip * beta0, "advantage_max": clip * beta0}


# method label -> (trainer method, regulariser name, its three strengths, method_options of a strength)
FRONTIER = {
    "adrpo": ("adrpo", "beta0", (0.5, 1.0, 2.0), lambda b: {**adrpo_options(b), **NORMALISED}),
    # the lab measures W2 to the base itself (HeldoutProbe): no base forward pass in training only to log it
    "adrpo-ema": ("adrpo", "beta0", (0.5, 1.0, 2.0),
                  lambda b: {**adrpo_options(b), **NORMALISED, "anchor": "ema", "base_divergence": False}),
    "fixed-beta": ("fixed-beta", "beta", (0.5, 1.0, 2.0),
                   lambda b: {"beta": b, "advantage_min": -1.0, "advantage_max": 1.0, **NORMALISED}),
    "orw-cfm-w2": ("orw-cfm-w2", "beta", (0.25, 1.0, 4.0), lambda b: {"beta": b, **NORMALISED}),
    "raft": ("raft", "top_k", (1, 2, 4), lambda k: {"top_k": k}),
    "dpo": ("dpo", "beta", (500.0, 2500.0, 12500.0), lambda b: {"beta": b}),
    "nft": ("nft", "kl_beta", (1e-4, 0.1, 1.0), lambda b: {"kl_beta": b}),
    "awm": ("awm", "kl_beta", (0.003, 0.03, 0.3), lambda b: {"kl_beta": b}),
}
# each method's learning rate when the lab sweeps none (LoRA rank 8 on the tiny base; see docs/method_lab.md)
LEARNING_RATES = {"adrpo": 1e-2, "adrpo-ema": 1e-2, "fixed-beta": 1e-2, "orw-cfm-w2": 1e-2, "raft": 3e-3,
                  "dpo": 1e-2, "nft": 3e-3, "awm": 3e-3}


@dataclass(frozen=True)
class LabRun:
    """One fine-tuning setting: ``method`` (a label of :data:`FRONTIER`) at ``strength`` of its regulariser;
    ``overrides`` of the lab's training settings."""

    name: str
    method: str
    strength: float
    overrides: dict


@dataclass
class LabSettings:
    """What every run shares. The defaults are the full lab: the frontier, one seed."""

    output_dir: str = _f("outputs/method-lab", "Where results.json, the tables, plots, grids and each run's files go.")
    pretrained_model: str = _f("builtin:tiny-sd3-shapes", "The base every run fine-tunes: a pipeline of the SD3 family "
                                                          "that reads the shapes captions.")
    prompt_file: str = _f("prompts/shapes.txt", "The training captions (of the shapes grammar).")
    reward: str = _f("shapes", "The reward every run maximises (a scorer name).")
    seeds: list = _f([0], "Training seeds; each run is repeated for each.")
    steps: int = _f(60, "Training steps per run.")
    eval_every: int = _f(20, "Steps between held-out evaluations (and checkpoints); steps must be a multiple of it.")
    prompts_per_step: int = _f(4, "Prompts per training step.")
    images_per_prompt: int = _f(8, "Images per prompt (the group of the advantages).")
    timesteps_per_sample: int = _f(4, "Stratified loss times per image.")
    learning_rates: list = _f([], "Sweep these rates on the first seed and keep the best on validation seeds; empty: "
                                  "each method's own rate (LEARNING_RATES).")
    learning_rate_factors: list = _f([], "Sweep each method's own rate (LEARNING_RATES) times these factors, as "
                                         "learning_rates does; not with learning_rates.")
    sampler_steps: int = _f(12, "Euler steps of rollouts and held-out samples.")
    methods: list = _f(list(FRONTIER), "Only these methods of the frontier.")
    strengths: int = _f(3, "The first 1, 2 or 3 strengths of each method's regulariser.")
    eval_images: int = _f(8, "Held-out images per prompt: images (eval_seed, prompt, 0 .. eval_images - 1).")
    eval_seed: int = _f(10_000, "The held-out seed.")
    val_images: int = _f(8, "Validation images per prompt, which choose each run's checkpoint.")
    val_seed: int = _f(50_000, "The validation seed (not eval_seed: its images never meet the held-out ones).")
    matched_diversity: float = _f(0.9, "The matched-diversity table: feature diversity >= this fraction of the base's.")
    runs: list = _f([], "Only these runs, by their names in the table, e.g. 'adrpo beta0=1' 'nft kl_beta=0.1'.")

    def training(self) -> dict:
        """TrainConfig values shared by every run (a run's overrides go on top)."""
        return dict(
            pretrained_model=self.pretrained_model, prompt_file=self.prompt_file, reward=self.reward,
            reward_scale=1.0, prompts_per_step=self.prompts_per_step, images_per_prompt=self.images_per_prompt,
            num_inference_steps=self.sampler_steps, guidance_scale=1.0, resolution=32, max_sequence_length=8,
            rollout_batch_size=64, train_batch_size=64, timesteps_per_sample=self.timesteps_per_sample,
            time_sampling="sampler", lora_rank=8, lora_alpha=8, max_grad_norm=1.0,
            checkpointing_steps=self.eval_every, checkpoints_total_limit=1, sample_every=0,
            eval_prompts=0, report_to="none",  # no trainer's own held-out check: the lab's probe measures
        )


# A smoke scale for tests (adrpo-lab --quick): one caption per skill, one seed, two steps each evaluated, a few
# images of 6 Euler steps, two strengths of three methods.
QUICK = dict(prompt_file="prompts/shapes_smoke.txt", steps=2, eval_every=1, sampler_steps=6, prompts_per_step=2,
             images_per_prompt=4, timesteps_per_sample=1, learning_rates=[3e-3, 3e-2], methods=["adrpo", "raft", "nft"],
             strengths=2, eval_images=2, val_images=2)


def _positive_numbers(key: str):
    """A reader of ``key``'s list: each item a positive float. YAML reads ``3e-3`` (no dot) as text, so text that
    reads as a number counts."""
    def read(value) -> list[float]:
        try:
            numbers = [float(v) for v in value if not isinstance(v, bool)]
        except (TypeError, ValueError):
            numbers = []
        if not isinstance(value, list) or len(numbers) != len(value) or not all(v > 0 for v in numbers):
            raise ValueError(f"{key} must be a list of positive numbers, got {value!r}")
        return numbers
    return read


RATE_KEYS = {key: _positive_numbers(key) for key in ("learning_rates", "learning_rate_factors")}


def settings_problems(settings: LabSettings) -> list[str]:
    """What is wrong with ``settings``, checked before any model loads."""
    problems = []
    if min(settings.steps, settings.eval_every, settings.sampler_steps) < 1 or not settings.seeds:
        problems.append("steps, eval_every and sampler_steps must be positive and seeds non-empty")
    elif settings.steps % settings.eval_every:
        problems.append(f"steps ({settings.steps}) must be a multiple of eval_every ({settings.eval_every})")
    if len(set(settings.seeds)) != len(settings.seeds):
        problems.append(f"seeds must be distinct, got {settings.seeds}")
    if settings.val_seed == settings.eval_seed:
        problems.append(f"val_seed must differ from eval_seed ({settings.eval_seed}): validation would choose on the "
                        "held-out images")
    for key, read in RATE_KEYS.items():
        try:
            read(getattr(settings, key))
        except ValueError as err:
            problems.append(str(err))
    if settings.learning_rates and settings.learning_rate_factors:
        problems.append("give learning_rates or learning_rate_factors, not both")
    for check in (lambda: lab_runs(settings), lambda: check_model_source(settings.pretrained_model)):
        try:
            check()
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err))
    return problems


def lab_runs(settings: LabSettings) -> list[LabRun]:
    """The frontier: each method of ``settings.methods`` at the first ``settings.strengths`` strengths of its
    regulariser; only the runs named in ``settings.runs`` when it is not empty."""
    unknown = [m for m in settings.methods if m not in FRONTIER]
    if unknown or not settings.methods:
        raise ValueError(f"unknown method(s) {unknown}; the lab's methods are {list(FRONTIER)}")
    if not 1 <= settings.strengths <= 3:
        raise ValueError(f"strengths must be 1, 2 or 3, got {settings.strengths}")
    runs = []
    for label in settings.methods:
        method, parameter, strengths, options = FRONTIER[label]
        for strength in strengths[: settings.strengths]:
            runs.append(LabRun(f"{label} {parameter}={strength:g}", label, strength,
                               {"method": method, "method_options": options(strength)}))
    unknown = [name for name in settings.runs if name not in {run.name for run in runs}]
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; the runs are {[run.name for run in runs]}")
    return [run for run in runs if run.name in settings.runs] if settings.runs else runs


class RandomFeatures(torch.nn.Module):
    """A fixed, never trained conv net (seed 0) for the feature diversity: three 3x3 convolutions (16, 32, 64
    channels) with ReLU, 2x2 average pooling after the first two, then 4x4 adaptive average pooling: 1024
    features of local colour and edge patterns on a coarse 4x4 layout."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        layers = []
        for i, (cin, cout) in enumerate(((3, 16), (16, 32), (32, 64))):
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
            with torch.no_grad():
                conv.weight.normal_(0, (2 / (cin * 9)) ** 0.5, generator=generator)  # He init: ReLU keeps the scale
                conv.bias.zero_()
            layers += [conv, torch.nn.ReLU()] + ([torch.nn.AvgPool2d(2)] if i < 2 else [])
        self.net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


def diversities(images: torch.Tensor, groups: list[int], features: RandomFeatures) -> dict[str, float]:
    """``pixel_diversity`` and ``feature_diversity`` (module docstring) of images grouped by prompt."""
    from ..scorers.diversity import clip_diversity

    pixels = images.flatten(1)
    return {
        "pixel_diversity": clip_diversity(pixels, groups, distance="l2", normalize=False, scale=pixels.shape[1] ** -0.5),
        "feature_diversity": clip_diversity(features(images), groups, distance="cosine"),
    }


class HeldoutProbe:
    """Held-out measurements of a trainer's current policy (module docstring). Image ``j`` of prompt ``i`` is the
    held-out image ``(eval_seed, i, j)`` of the one seed scheme (:mod:`adrpo_diffusion.seeds`); the first
    :meth:`measure_base` fixes the W2 inputs."""

    TIMES = (0.125, 0.375, 0.625, 0.875)

    def __init__(self, num_prompts: int, eval_images: int, eval_seed: int, reward: str):
        from ..scorers import build_scorer

        self.pairs = [(i, j) for i in range(num_prompts) for j in range(eval_images)]
        self.eval_seed = eval_seed
        self.scorer = build_scorer(reward)
        self.shapes = build_scorer("shapes")  # its checks: does the policy still draw what the caption says?
        self.features = RandomFeatures()
        self.w2_inputs = self.base_rewards = None

    def _generate(self, trainer) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = trainer.cfg
        generators = image_generators((self.eval_seed, i, j) for i, j in self.pairs)
        x1 = trainer.family.sample(trainer.cache, [i for i, _ in self.pairs], num_inference_steps=cfg.num_inference_steps,
                                   resolution=cfg.resolution, batch_size=cfg.rollout_batch_size, generators=generators)
        return x1, trainer.family.decode(x1, cfg.rollout_batch_size)

    def _w2_divergence(self, trainer) -> float:
        from ..losses import flow_sample, per_sample_mse

        x1, noise, t, rows = self.w2_inputs
        family = trainer.family
        cond = trainer.cache.select(rows, x1.device, x1.dtype)
        x_sigma, sigma, _ = flow_sample(x1, noise, t)
        timestep = family.timestep(sigma)
        model = trainer.accelerator.unwrap_model(trainer.model)
        with torch.no_grad():
            v_theta = family.velocity(model, x_sigma, timestep, cond)
            return per_sample_mse(v_theta, family.reference(model)(x_sigma, timestep, cond)).mean().item()

    def _record(self, trainer, images: torch.Tensor) -> dict:
        prompts = [trainer.prompts[i] for i, _ in self.pairs]
        details = self.shapes.details(images, prompts)
        rewards = self.scorer.score(images, prompts)
        if self.base_rewards is None:
            self.base_rewards = rewards
        gain = paired_change(self.base_rewards, rewards)  # paired: the same held-out noise for the policy and the base
        return {"reward": rewards.mean().item(), "reward_gain_se": gain["improvement_se"],
                **{name: details[name].nanmean().item() for name in (*CHECK_NAMES, "geneval_pass")},
                **diversities(images, [i for i, _ in self.pairs], self.features)}

    @torch.no_grad()
    def measure(self, trainer) -> tuple[dict, torch.Tensor]:
        """Every held-out metric of the trainer's policy (LoRA on), and its held-out images."""
        _, images = self._generate(trainer)
        return {**self._record(trainer, images), "w2_divergence": self._w2_divergence(trainer)}, images

    @torch.no_grad()
    def reward(self, trainer) -> float:
        """The mean reward of the trainer's policy (LoRA on) on this probe's seeds."""
        _, images = self._generate(trainer)
        return self.scorer.score(images, [trainer.prompts[i] for i, _ in self.pairs]).mean().item()

    @torch.no_grad()
    def measure_base(self, trainer) -> tuple[dict, torch.Tensor]:
        """The base model's record (adapters off) and its held-out images; fixes the W2 inputs and the rewards
        that later gains are paired with."""
        from ..families import adapters_off

        self.base_rewards = None
        with adapters_off(trainer.accelerator.unwrap_model(trainer.model)):
            x1, images = self._generate(trainer)
        repeats = len(self.TIMES)
        noise = torch.randn(x1.shape[0] * repeats, *x1.shape[1:], generator=torch.Generator().manual_seed(0))
        self.w2_inputs = (x1.repeat_interleave(repeats, dim=0), noise.to(x1.device, x1.dtype),
                          torch.tensor(self.TIMES * x1.shape[0], device=x1.device),
                          [i for i, _ in self.pairs for _ in range(repeats)])
        return {**self._record(trainer, images), "w2_divergence": 0.0}, images


def _quiet(path: Path):
    """Send the trainer's prints and progress bars to a log file (one line per run on the console)."""
    stack = contextlib.ExitStack()
    log = stack.enter_context(path.open("a"))
    stack.enter_context(contextlib.redirect_stdout(log))
    stack.enter_context(contextlib.redirect_stderr(log))
    return stack


def prepare_output_dir(path: str, resume: bool = False) -> Path:
    """An empty directory, or a previous lab's output: kept as is to resume it, else its runs are deleted (a new
    lab must never resume an old lab's checkpoints). Anything else is refused rather than overwritten."""
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not (out / "runs").is_dir() and not (out / "settings.json").is_file():
            raise FileExistsError(f"{out} exists and is not a method-lab output directory; choose another --output_dir")
        if not resume:
            shutil.rmtree(out / "runs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, value) -> None:
    """Write atomically: a killed lab never leaves a half-written file behind."""
    from ..evaluation.generate import write_atomic

    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1)))


def run_lab(settings: LabSettings, resume: bool = False) -> dict:
    """Train and track every run, then write ``results.json``, ``lab_table.md``, the plots and the grids.

    Per run: at its method's rate (:data:`LEARNING_RATES`), or, when ``settings.learning_rates`` or
    ``settings.learning_rate_factors`` (times the method's rate) is given, the first seed trains once per rate and the
    rate whose chosen checkpoint scores the highest *validation* reward is the run's rate for the other seeds (each
    rate's records in ``lr_sweep_records``). Every reported number is measured on the *held-out* noise seeds. Each
    (run, rate, seed) keeps its records in ``runs/<run>/lr-<rate>/seed-<seed>/records.json``, written after every
    evaluation next to the checkpoint of that step: with ``resume``, a killed lab resumes that checkpoint (the same
    settings are required) and finished steps are never trained again."""
    from ..prompts import load_prompts

    out = prepare_output_dir(settings.output_dir, resume)
    settings_file = out / "settings.json"
    if resume and settings_file.is_file() and json.loads(settings_file.read_text()) != dataclasses.asdict(settings):
        raise ValueError(f"--resume: {settings_file} was written with other settings; resume with the same options")
    _write_json(settings_file, dataclasses.asdict(settings))
    prompts = load_prompts(settings.prompt_file)
    probes = {"heldout": HeldoutProbe(len(prompts), settings.eval_images, settings.eval_seed, settings.reward),
              "validation": HeldoutProbe(len(prompts), settings.val_images, settings.val_seed, settings.reward)}
    results = {"settings": dataclasses.asdict(settings), "base": None, "runs": {}}
    start = time.perf_counter()

    def train(run: LabRun, lr: float, seed: int) -> list[dict]:
        records = _train_and_track(settings, run, lr, seed, out, prompts, probes, results)
        records = [{"step": 0, **results["base"]}] + records
        best = records[chosen_index(records)]
        print(f"[lab] {run.name:24s} lr {lr:<7g} seed {seed}: reward {records[0]['reward']:.3f} -> "
              f"{best['reward']:.3f} at step {best['step']} (pass rate {records[0]['geneval_pass']:.2f} -> "
              f"{best['geneval_pass']:.2f}), feature diversity {best['feature_diversity']:.3f}, "
              f"W2 {best['w2_divergence']:.2e} ({time.perf_counter() - start:.0f} s)", flush=True)
        return records

    for run in lab_runs(settings):
        first, others = settings.seeds[0], settings.seeds[1:]
        rates = run_rates(settings, run.method)
        sweep = {lr: train(run, lr, first) for lr in rates}
        best = max(sweep, key=lambda lr: sweep[lr][chosen_index(sweep[lr])]["validation_reward"])
        results["runs"][run.name] = {
            "method": run.method, "strength": run.strength, "overrides": run.overrides, "learning_rate": best,
            "lr_sweep": {f"{lr:g}": records[chosen_index(records)]["validation_reward"] for lr, records in sweep.items()},
            "lr_sweep_records": {f"{lr:g}": records for lr, records in sweep.items()} if len(sweep) > 1 else {},
            "seeds": {str(first): sweep[best], **{str(seed): train(run, best, seed) for seed in others}},
        }
        chosen = sweep[best][chosen_index(sweep[best])]["step"]
        source = _run_dir(out, run.name, best, first) / f"heldout-step-{chosen}.safetensors"
        target = out / "samples" / f"{run_slug(run.name)}.safetensors"
        if source.is_file():
            shutil.copyfile(source, target)
        else:  # chosen at step 0: the comparison shows the base's images (never an older lab's file)
            target.unlink(missing_ok=True)
    results["seconds"] = time.perf_counter() - start
    _write_json(out / "results.json", results)
    (out / "lab_table.md").write_text(render_table(results))
    plot_results(results, out)
    save_comparison(results, prompts, out)
    return results


def run_rates(settings: LabSettings, method: str) -> list[float]:
    """The learning rates a run of ``method`` trains at: ``learning_rates``, or the method's own rate times each of
    ``learning_rate_factors`` (to 3 significant digits: 1e-2 x 0.3 is 3e-3, not 0.0030000000000000005), or its own."""
    own = LEARNING_RATES[method]
    return settings.learning_rates or [float(f"{own * f:.3g}") for f in settings.learning_rate_factors] or [own]


def chosen_index(records: list[dict]) -> int:
    """The record (step 0, the base, included) with the best validation reward: the run's chosen checkpoint."""
    return max(range(len(records)), key=lambda k: records[k]["validation_reward"])


def run_slug(name: str) -> str:
    """A run's name as a file name: ``nft kl_beta=0.1`` -> ``nft_kl_beta0.1``."""
    return name.replace(" ", "_").replace("=", "")


def _run_dir(out: Path, name: str, lr: float, seed: int) -> Path:
    return out / "runs" / run_slug(name) / f"lr-{lr:g}" / f"seed-{seed}"


def _save_images(images: torch.Tensor, path: Path) -> None:
    """Held-out images as 8-bit RGB in a safetensors file (for the comparison grid)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": (images.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()}, str(path))
    umask_permissions(path)


def _load_images(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["images"].float() / 255


class _Tracker(TrainerCallback):
    """The lab's probes as a trainer callback: the base first (once per lab, also on resume: it fixes the probes'
    W2 inputs and base rewards), then a record every ``eval_every`` steps, written next to that step's checkpoint.
    A resumed trainer whose checkpoint has no record yet (killed between the two) is measured before it trains."""

    def __init__(self, settings: LabSettings, out: Path, run_dir: Path, seed: int, prompts: list[str], probes: dict,
                 results: dict, records: list[dict]):
        self.settings, self.out, self.run_dir, self.seed = settings, out, run_dir, seed
        self.prompts, self.probes, self.results, self.records = prompts, probes, results, records

    def on_train_begin(self, trainer) -> None:
        if self.results["base"] is None:
            self.results["base"], base_images = self.probes["heldout"].measure_base(trainer)
            self.results["base"]["validation_reward"] = self.probes["validation"].measure_base(trainer)[0]["reward"]
            _save_images(base_images, self.out / "samples" / "base.safetensors")
            _save_grid(base_images, self.prompts, self.out / "samples_base.png")
            _save_grid(data_images(self.prompts, self.settings.eval_images), self.prompts, self.out / "samples_data.png")
        if trainer.step > (self.records[-1]["step"] if self.records else 0):
            self._measure(trainer)

    def on_step_end(self, trainer, metrics: dict) -> None:
        if trainer.step % self.settings.eval_every == 0:
            self._measure(trainer)

    def _measure(self, trainer) -> None:
        record, images = self.probes["heldout"].measure(trainer)
        record["validation_reward"] = self.probes["validation"].reward(trainer)
        if self.seed == self.settings.seeds[0]:
            _save_images(images, self.run_dir / f"heldout-step-{trainer.step}.safetensors")
        self.records.append({"step": trainer.step, **record})
        _write_json(self.run_dir / "records.json", self.records)


def _train_and_track(settings: LabSettings, run: LabRun, lr: float, seed: int, out: Path, prompts: list[str],
                     probes: dict, results: dict) -> list[dict]:
    """One (run, learning rate, seed): one Trainer (resuming the run's checkpoint, if any) whose :class:`_Tracker`
    measures the held-out and validation probes every ``eval_every`` steps; the first trainer of the lab also
    measures the base. Returns the records (resumed ones included)."""
    from ..config import load_config
    from ..trainer import Trainer

    run_dir = _run_dir(out, run.name, lr, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    records_file = run_dir / "records.json"
    records = json.loads(records_file.read_text()) if records_file.is_file() else []
    if records and records[-1]["step"] == settings.steps and results["base"] is not None:
        return records
    values = {**settings.training(), **run.overrides, "learning_rate": lr, "seed": seed, "output_dir": str(run_dir),
              "max_steps": settings.steps, "resume_from_checkpoint": "latest"}
    with _quiet(run_dir / "train.log"):
        trainer = Trainer(load_config(None, values),
                          callbacks=[_Tracker(settings, out, run_dir, seed, prompts, probes, results, records)])
        trainer.train()
    return records


def data_images(prompts: list[str], per_prompt: int, seed: int = 0) -> torch.Tensor:
    """``per_prompt`` images of the training data for every prompt (the generator's, for comparison)."""
    from ..tasks.shapes import draw_caption

    generator = torch.Generator().manual_seed(seed)
    return torch.stack([draw_caption(prompt, generator) for prompt in prompts for _ in range(per_prompt)])


def _save_grid(images: torch.Tensor, prompts: list[str], path: Path) -> None:
    """A PNG grid of images in [0, 1] grouped by prompt: one row per prompt, labelled with it."""
    from ..utils import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=len(images) // len(prompts), labels=prompts).save(path)


# ----------------------------------------------------------------------------------------------------------
# Summaries, table, plots


def trajectory(run: dict, metric: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, and the mean and standard error over seeds of ``metric`` at each step."""
    from ..evaluation.aggregate import mean_and_se

    per_seed = list(run["seeds"].values())
    steps = [r["step"] for r in per_seed[0]]
    stats = [mean_and_se([records[k][metric] for records in per_seed]) for k in range(len(steps))]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def matched_reward(records: list[dict], target: float) -> tuple[float, float, int]:
    """The best held-out reward along a run's trajectory (the base, then each evaluation, joined by straight lines)
    while its feature diversity stays >= ``target``: ``(reward, held-out SE of its gain, step)``, where a line
    that crosses ``target`` contributes its point at ``target`` (step: the line's end)."""
    points = [(r["feature_diversity"], r["reward"], r["reward_gain_se"], r["step"]) for r in records]
    candidates = [(reward, se, step) for diversity, reward, se, step in points if diversity >= target]
    for (d0, r0, s0, _), (d1, r1, s1, step) in zip(points, points[1:]):
        if (d0 - target) * (d1 - target) < 0:
            w = (d0 - target) / (d0 - d1)
            candidates.append((r0 + w * (r1 - r0), s0 + w * (s1 - s0), step))
    return max(candidates) if candidates else (float("nan"), float("nan"), 0)


def _fmt(mean: float, se: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"


def _chosen(run: dict) -> list[dict]:
    """Each seed's record at its chosen checkpoint."""
    return [records[chosen_index(records)] for records in run["seeds"].values()]


def best_runs(results: dict) -> dict[str, str]:
    """Each method's run whose chosen checkpoints score the best mean validation reward."""
    best = {}
    for name, run in results["runs"].items():
        score = sum(r["validation_reward"] for r in _chosen(run)) / len(run["seeds"])
        if run["method"] not in best or score > best[run["method"]][1]:
            best[run["method"]] = (name, score)
    return {method: name for method, (name, _) in best.items()}


def render_table(results: dict) -> str:
    """Markdown: the held-out values of every run at its chosen checkpoint (mean ± SE over seeds), the base, and
    each method's reward at matched diversity."""
    from ..evaluation.aggregate import mean_and_se

    base, settings = results["base"], results["settings"]
    lines = [
        f"Held-out values ({settings['eval_images']} images per prompt) at each run's chosen checkpoint: the step of "
        f"0..{settings['steps']} (every {settings['eval_every']}) with the best reward on the validation seeds "
        f"({settings['val_images']} images per prompt, disjoint from the held-out ones); mean ± SE over seeds "
        f"{settings['seeds']}. Reward: the `{settings['reward']}` score in [0, 1]; pass: the GenEval-style fraction "
        "of images whose every check passes; colour, shape, count, position: the checks. Δ reward: the gain over the "
        "base; 'held-out SE': its standard error from the finite held-out set (paired over held-out images, averaged "
        "over seeds), shared by every run since all are measured on the same held-out noise.",
        "",
        "| run | lr | step | reward | Δ reward | held-out SE | pass | colour | shape | count | position | pixel div. "
        "| feature div. | W2 div. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| base | | 0 | {base['reward']:.4f} | | | {base['geneval_pass']:.3f} | {base['colour']:.3f} | "
        f"{base['shape']:.3f} | {base['count']:.3f} | {base['position']:.3f} | {base['pixel_diversity']:.3f} | "
        f"{base['feature_diversity']:.3f} | 0 |",
    ]
    for name, run in results["runs"].items():
        chosen = _chosen(run)

        def final(metric, digits=3, chosen=chosen):
            return _fmt(*mean_and_se([r[metric] for r in chosen]), digits)

        steps = "/".join(str(r["step"]) for r in chosen)
        gain = _fmt(*mean_and_se([r["reward"] - base["reward"] for r in chosen]), 4)
        heldout_se = sum(r["reward_gain_se"] for r in chosen) / len(chosen)
        lines.append(f"| {name} | {run['learning_rate']:g} | {steps} | {final('reward', 4)} | {gain} | "
                     f"{heldout_se:.4f} | {final('geneval_pass')} | {final('colour')} | {final('shape')} | "
                     f"{final('count')} | {final('position')} | {final('pixel_diversity')} | "
                     f"{final('feature_diversity')} | {final('w2_divergence', 5)} |")
    target = settings["matched_diversity"] * base["feature_diversity"]
    lines += ["", f"Reward at matched diversity: the best held-out reward along each run's trajectory while its "
              f"feature diversity stays >= {settings['matched_diversity']:g} x the base's ({target:.3f}), "
              "interpolated between evaluations; per method, its best strength (± SE over seeds, or the held-out SE "
              "with one seed).", "",
              "| method | run | reward | Δ reward | ± |", "|---|---|---|---|---|"]
    by_method = {}
    for name, run in results["runs"].items():
        values = [matched_reward(records, target) for records in run["seeds"].values()]
        mean, se = mean_and_se([v[0] for v in values])
        se = se if se is not None else values[0][1]
        if run["method"] not in by_method or mean > by_method[run["method"]][1]:
            by_method[run["method"]] = (name, mean, se)
    for method, (name, mean, se) in sorted(by_method.items(), key=lambda item: -item[1][1]):
        lines.append(f"| {method} | {name} | {mean:.4f} | {mean - base['reward']:+.4f} | {se:.4f} |")
    swept = {name: run for name, run in results["runs"].items() if run.get("lr_sweep_records")}
    if swept:
        lines += ["", f"Learning-rate sweep (seed {settings['seeds'][0]}): each rate's chosen checkpoint, and its "
                  "trajectory's Δ reward at matched diversity (held-out, as above); the run's rate (above) is the one "
                  "with the best validation reward.", "",
                  "| run | lr | step | validation reward | Δ reward | pass | feature div. | W2 div. | Δ at matched div. |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, run in swept.items():
            for lr, records in run["lr_sweep_records"].items():
                r = records[chosen_index(records)]
                mark = " (chosen)" if float(lr) == run["learning_rate"] else ""
                lines.append(f"| {name} | {lr}{mark} | {r['step']} | {r['validation_reward']:.4f} | "
                             f"{r['reward'] - base['reward']:+.4f} | {r['geneval_pass']:.3f} | "
                             f"{r['feature_diversity']:.3f} | {r['w2_divergence']:.5f} | "
                             f"{matched_reward(records, target)[0] - base['reward']:+.4f} |")
    lines.append("")
    return "\n".join(lines)


STYLES = ("-", "--", ":")


def _styles(results: dict) -> dict[str, tuple]:
    """Per run: its method's colour and its strength's line style."""
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(run["method"] for run in results["runs"].values()))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    styles, index = {}, {}
    for name, run in results["runs"].items():
        k = index[run["method"]] = index.get(run["method"], -1) + 1
        styles[name] = (colours[run["method"]], STYLES[k % len(STYLES)])
    return styles


def plot_results(results: dict, out: Path) -> list[Path]:
    """``frontier.png``: held-out reward against feature diversity and against W2 divergence (log scale above
    1e-3) along each run's training (mean over seeds; a star at the chosen checkpoint; colour: method, line style:
    strength), framed on the base and the stars (a run that collapses far below them leaves the frame);
    ``learning_curves.png``: reward, pass rate and feature diversity against steps (± SE bands over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles, base, written = _styles(results), results["base"], []
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, x_metric in zip(axes, ("feature_diversity", "w2_divergence")):
        stars, points = [base["reward"]], [(base[x_metric], base["reward"])]
        for name, run in results["runs"].items():
            colour, style = styles[name]
            steps, x, _ = trajectory(run, x_metric)
            _, y, _ = trajectory(run, "reward")
            ax.plot(x, y, linestyle=style, color=colour, marker="o", markersize=2.5, label=name)
            k = steps.index(_chosen(run)[0]["step"])
            ax.plot(x[k], y[k], marker="*", markersize=11, color=colour, markeredgecolor="black", linestyle="none")
            stars.append(y[k])
            points += zip(x, y)
        ax.scatter([base[x_metric]], [base["reward"]], color="black", zorder=5, s=40, label="base")
        # framed on the base and the stars: the tail of a run that collapses far below them leaves the frame
        bottom = min(stars) - 0.05
        inside = [x for x, y in points if y >= bottom]
        ax.set_ylim(bottom, max(y for _, y in points) + 0.01)
        ax.set_xlim(min(inside) - 0.02 * (max(inside) - min(inside)), max(inside) * 1.05 + 1e-9)
        ax.set_xlabel(x_metric.replace("_", " "))
        ax.set_ylabel(f"held-out {results['settings']['reward']} reward")
        ax.grid(alpha=0.3)
    axes[0].axvline(results["settings"]["matched_diversity"] * base["feature_diversity"], color="grey", linewidth=0.8,
                    linestyle="--")
    axes[0].invert_xaxis()  # training moves right: less diversity
    axes[1].set_xscale("symlog", linthresh=1e-3)  # W2 from 1e-3 (a frozen anchor) to 1 and more (a collapse)
    axes[1].set_xlim(left=0)
    axes[1].legend(fontsize=6, ncol=2)
    written.append(_save_figure(fig, "Frontier: reward against diversity and W2 to the base along training (star: "
                                     "chosen checkpoint)", out / "frontier.png"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, metric in zip(axes, ("reward", "geneval_pass", "feature_diversity")):
        for name, run in results["runs"].items():
            colour, style = styles[name]
            steps, mean, se = trajectory(run, metric)
            ax.plot(steps, mean, linestyle=style, color=colour, marker="o", markersize=2.5, label=name)
            if None not in se:
                ax.fill_between(steps, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                                color=colour, alpha=0.12)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    written.append(_save_figure(fig, "Held-out learning curves (mean ± SE over seeds)", out / "learning_curves.png"))
    return written


def _save_figure(fig, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_comparison(results: dict, prompts: list[str], out: Path, per_cell: int = 2, scale: int = 2) -> Path:
    """``samples_comparison.png``: one row per prompt, one column per model (the base, then each method's best run
    at its chosen checkpoint), ``per_cell`` held-out images each: the same prompts and noise in every column."""
    from PIL import Image, ImageDraw, ImageFont

    from ..utils import image_grid

    columns = {"base": out / "samples" / "base.safetensors"}
    for method, name in best_runs(results).items():
        columns[method] = out / "samples" / f"{run_slug(name)}.safetensors"
        if not columns[method].is_file():  # chosen at step 0: the base's images
            columns[method] = columns["base"]
    per_prompt = results["settings"]["eval_images"]
    cells = [_load_images(path).unflatten(0, (len(prompts), per_prompt))[:, :per_cell] for path in columns.values()]
    images = torch.stack(cells, dim=1).flatten(0, 2)  # prompt-major, then column, then image
    images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    cols = len(columns) * per_cell
    grid = image_grid(images, cols=cols, labels=prompts, min_cell=0)  # enlarged above
    font, cell = ImageFont.load_default(), images.shape[-1] * per_cell
    band = grid.width - cell * len(columns)
    header = Image.new("RGB", (grid.width, 16), "white")
    draw = ImageDraw.Draw(header)
    for k, label in enumerate(columns):
        width = draw.textbbox((0, 0), label, font=font)[2]
        draw.text((band + k * cell + (cell - width) / 2, 2), label, fill="black", font=font)
    figure = Image.new("RGB", (grid.width, grid.height + header.height), "white")
    figure.paste(header, (0, 0))
    figure.paste(grid, (0, header.height))
    path = out / "samples_comparison.png"
    figure.save(path)
    return path


def main(argv=None) -> int:
    parser = arg_parser(LabSettings, "adrpo-lab", config_help="YAML file of lab settings; --key value overrides it.",
                        description="The method lab: each method's reward-diversity frontier on the coloured-shapes "
                        "task (docs/method_lab.md). Every setting can be given as --key value (a list as several "
                        "values: --seeds 0 1 2) or in a YAML file (--config).")
    parser.add_argument("--quick", action="store_true", help="smoke scale: one caption per skill, one seed, two "
                        "steps, a few images (QUICK; the config file and --key value go on top)")
    parser.add_argument("--resume", action="store_true", help="continue a killed lab in --output_dir (same options)")
    try:
        args, overrides = overrides_from_args(LabSettings, parser, argv)
        settings = load(LabSettings, args.config, overrides, under=QUICK if args.quick else None,
                        name="lab settings", overrides_from="the command line", convert=RATE_KEYS)
    except ConfigError as err:
        parser.error(str(err))
    try:
        import matplotlib  # noqa: F401  (the plots come last: fail now, not after the runs)
    except ImportError:
        parser.error("the lab's plots need matplotlib: pip install -c constraints-ci.txt -e '.[lab]'")
    problems = settings_problems(settings)
    if problems:
        parser.error("\n  ".join(["invalid lab settings:", *problems]))
    results = run_lab(settings, resume=args.resume)
    print((Path(settings.output_dir) / "lab_table.md").read_text())
    print(f"[lab] {results['seconds']:.0f} s; results, table, plots and grids in {settings.output_dir}")
    return 0
