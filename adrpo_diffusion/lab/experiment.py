"""The method lab: ADRPO against its baselines on the coloured-shapes task, on a CPU, with the project's trainer.

Every run fine-tunes the same base (``builtin:tiny-sd3-shapes``) with :class:`adrpo_diffusion.trainer.Trainer`
and the same compute: ``steps`` iterations of ``prompts_per_step x images_per_prompt`` sampled images and one
optimiser step each, with the same number of (noise, t) draws per image in the loss. Runs differ only in their
loss weights (``method`` and its parameters) or, in the ablation, in one ADRPO setting. The reward is ``color``
(how close the pixels are to the caption's colour) on the single-colour captions of the shapes grammar; the
``shapes`` checks tell whether the policy still draws what the caption says while it climbs that reward.

Learning rate. Each run's first seed trains at every rate of ``learning_rates``; the rate with the best reward on
*validation* noise seeds is the run's rate, and its other seeds train at that rate. Reported numbers come from the
disjoint *held-out* seeds, so the choice does not flatter the report.

Tracking. A run trains in segments of ``eval_every`` steps: each segment is a fresh ``Trainer`` that resumes
exactly from the previous segment's checkpoint (``resume_from_checkpoint: latest``). After each segment, and
once for the base, :class:`HeldoutProbe` measures the current policy on held-out seeds (never used in training):

- ``reward``: the mean training reward (raw, in ``[0, 1]``, whatever the run's ``reward_scale``) of
  ``eval_images`` images for each prompt of the prompt file; ``colour``, ``shape``, ``count``, ``position``: the
  ``shapes`` checks (:mod:`adrpo_diffusion.scorers.shapes`).
- ``pixel_diversity``: for each prompt, the mean over pairs of its images of the RMS pixel distance
  ``||x_i - x_j||_2 / sqrt(3 H W)`` (images in ``[0, 1]``), averaged over prompts.
- ``feature_diversity``: the same pairs compared by the cosine distance ``1 - cos`` of :class:`RandomFeatures`,
  a fixed random conv net: it sees colours, edges and their coarse layout, and a shape moved by a pixel or two
  stays close, unlike in pixel space. (A random net, not the tiny VAE's latents: those are what the policy
  generates, so their distances would mirror the pixel distances.)
- ``w2_divergence``: ``E ||v_theta - v_ref||^2`` (mean over latent elements, as the trainer's ``w2_divergence``)
  between the policy and the base on fixed held-out noisy inputs: the base's own held-out samples ``x1``, fixed
  noise, and ``t`` in {1/8, 3/8, 5/8, 7/8}.

Results: ``results.json`` (every record of every run and seed), ``lab_table.md`` (final values, mean +- standard
error over seeds), and PNG plots: reward against diversity and against divergence along training (the paper's
Fig. 3 analogue), and learning curves; for the method comparison and for the ADRPO ablation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

METRICS = ("reward", "pixel_diversity", "feature_diversity", "w2_divergence")
CHECK_NAMES = ("colour", "shape", "count", "position")


@dataclass(frozen=True)
class LabRun:
    """One fine-tuning setting: ``overrides`` of the lab's training settings; ``group`` is ``methods`` or
    ``ablation``."""

    name: str
    group: str
    overrides: dict


@dataclass
class LabSettings:
    """What every run shares. The defaults are the full lab (22 minutes on 2 CPU cores, measured)."""

    output_dir: str = "outputs/method-lab"
    pretrained_model: str = "builtin:tiny-sd3-shapes"
    prompt_file: str = "prompts/shapes_colour.txt"
    reward: str = "color"
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    steps: int = 30
    eval_every: int = 15
    prompts_per_step: int = 4
    images_per_prompt: int = 8
    timesteps_per_sample: int = 1
    learning_rates: list = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    sampler_steps: int = 12
    reward_scale: float = 20.0
    beta0: float = 1.0
    orw_betas: list = field(default_factory=lambda: [0.25, 1.0, 4.0])
    eval_images: int = 20
    eval_seed: int = 10_000
    val_images: int = 8
    val_seed: int = 50_000  # its seeds (val_seed + 1000 i + j) never meet the held-out ones
    ablation: str = "none"  # all, one (the first ablation run only) or none
    runs: list = field(default_factory=list)  # only these runs (by name; of the methods and the chosen ablation)

    def training(self) -> dict:
        """TrainConfig values shared by every run (a run's overrides go on top)."""
        return dict(
            pretrained_model=self.pretrained_model, prompt_file=self.prompt_file, reward=self.reward,
            reward_scale=self.reward_scale, method="adrpo", method_options=adrpo_options(self.beta0),
            prompts_per_step=self.prompts_per_step, images_per_prompt=self.images_per_prompt,
            num_inference_steps=self.sampler_steps, guidance_scale=1.0, resolution=32, max_sequence_length=8,
            rollout_batch_size=64, train_batch_size=32, timesteps_per_sample=self.timesteps_per_sample,
            lora_rank=8, lora_alpha=8, max_grad_norm=1.0,
            checkpointing_steps=self.eval_every, checkpoints_total_limit=1, sample_every=0,
            eval_prompts=0, report_to="none",  # no trainer's own held-out check: the lab's probe measures
        )


def adrpo_options(beta0: float, clip: float = 1.0) -> dict:
    """ADRPO's method_options with advantages clipped to ``[-clip * beta0, clip * beta0]``."""
    return {"beta0": beta0, "advantage_min": -clip * beta0, "advantage_max": clip * beta0}


def quick_settings(output_dir: str) -> LabSettings:
    """A smoke scale for tests: one seed, two segments of one step, a few images."""
    return LabSettings(output_dir=output_dir, seeds=[0], steps=2, eval_every=1, prompts_per_step=2,
                       images_per_prompt=4, learning_rates=[3e-3, 3e-2], orw_betas=[1.0], eval_images=2, val_images=2,
                       ablation="one")


def lab_runs(settings: LabSettings) -> list[LabRun]:
    """The method comparison (paper defaults for ADRPO: beta0 = 1, A in [-1, 1]) and the ADRPO ablation:
    clip range 0.5x / 2x beta0, raw reward (x1) / x100 instead of the lab's scale, group size K / 2 and 2K at a
    fixed number of images per step (``settings.ablation``: all of them, the first one only, or none); only the
    runs named in ``settings.runs`` when it is not empty."""
    if settings.ablation not in ("all", "one", "none"):
        raise ValueError(f"ablation must be all, one or none, got {settings.ablation!r}")
    b0 = settings.beta0
    runs = [LabRun("adrpo", "methods", {})]
    runs += [LabRun(f"orw-cfm-w2 beta={beta:g}", "methods", {"method": "orw-cfm-w2", "method_options": {"beta": beta}})
             for beta in settings.orw_betas]
    fixed = {"beta": b0, "advantage_min": -b0, "advantage_max": b0}
    runs += [LabRun(f"fixed-beta beta={b0:g}", "methods", {"method": "fixed-beta", "method_options": fixed}),
             LabRun("raft top-1", "methods", {"method": "raft", "method_options": {"top_k": 1}}),
             LabRun("dpo", "methods", {"method": "dpo", "method_options": {}})]
    if settings.ablation != "none":
        k, images = settings.images_per_prompt, settings.prompts_per_step * settings.images_per_prompt
        ablation = [LabRun(f"adrpo clip x{f:g}", "ablation", {"method_options": adrpo_options(b0, f)}) for f in (0.5, 2.0)]
        ablation += [LabRun(f"adrpo reward x{s:g}", "ablation", {"reward_scale": s}) for s in (1.0, 100.0)]
        ablation += [LabRun(f"adrpo K={g}", "ablation", {"images_per_prompt": g, "prompts_per_step": images // g})
                     for g in (k // 2, 2 * k) if g >= 2 and images % g == 0]
        runs += ablation[:1] if settings.ablation == "one" else ablation
    unknown = [name for name in settings.runs if name not in {run.name for run in runs}]
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; with --ablation {settings.ablation} the runs are "
                         f"{[run.name for run in runs]}")
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
    """Held-out measurements of a trainer's current policy (module docstring). The held-out images of prompt
    ``i`` and image ``j`` use the seed ``eval_seed + 1000 i + j``; the first :meth:`measure_base` fixes the
    W2 inputs."""

    TIMES = (0.125, 0.375, 0.625, 0.875)

    def __init__(self, num_prompts: int, eval_images: int, eval_seed: int, reward: str):
        from ..scorers import build_scorer

        self.pairs = [(i, j) for i in range(num_prompts) for j in range(eval_images)]
        self.seeds = [eval_seed + 1000 * i + j for i, j in self.pairs]
        self.scorer = build_scorer(reward)
        self.shapes = build_scorer("shapes")  # its checks: does the policy still draw what the caption says?
        self.features = RandomFeatures()
        self.w2_inputs = self.base_rewards = None

    def _generate(self, trainer) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = trainer.cfg
        generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        x1 = trainer.family.sample(trainer.cache, [i for i, _ in self.pairs], num_inference_steps=cfg.num_inference_steps,
                                   resolution=cfg.resolution, batch_size=cfg.rollout_batch_size, generators=generators)
        return x1, trainer.family.decode(x1, cfg.rollout_batch_size)

    def _w2_divergence(self, trainer) -> float:
        from ..losses import per_sample_mse

        x1, noise, t, rows = self.w2_inputs
        family = trainer.family
        cond = trainer.cache.select(rows, x1.device, x1.dtype)
        x_sigma, timestep, _ = family.flow_matching_pair(x1, noise, t)
        model = trainer.accelerator.unwrap_model(trainer.model)
        with torch.no_grad():
            v_theta = family.velocity(model, x_sigma, timestep, cond)
            return per_sample_mse(v_theta, family.reference(model)(x_sigma, timestep, cond)).mean().item()

    def _record(self, trainer, images: torch.Tensor) -> dict:
        prompts = [trainer.prompts[i] for i, _ in self.pairs]
        checks = self.shapes.checks(images, prompts)
        rewards = self.scorer.score(images, prompts)
        if self.base_rewards is None:
            self.base_rewards = rewards
        gain = rewards - self.base_rewards  # paired: the same held-out noise for the policy and the base
        return {"reward": rewards.mean().item(), "reward_gain_se": (gain.std() / gain.numel() ** 0.5).item(),
                **{name: checks[name].nanmean().item() for name in CHECK_NAMES},
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
    """Train and track every run, then write ``results.json``, ``lab_table.md`` and the plots.

    Per run: the first seed trains once per learning rate of ``settings.learning_rates``; the rate whose final
    policy scores the highest reward on the *validation* noise seeds (``val_images`` per prompt, disjoint from the
    held-out ones) is the run's rate, and the other seeds train at that rate only. Every reported number is
    measured on the *held-out* noise seeds. Each (run, rate, seed) keeps its records in
    ``runs/<run>/lr-<rate>/seed-<seed>/records.json``, written after every segment next to the checkpoint of that
    step: with ``resume``, a killed lab continues from there (the same settings are required) and finished
    segments are never trained again."""
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
        last = records[-1]
        print(f"[lab] {run.name:24s} lr {lr:<7g} seed {seed}: reward {results['base']['reward']:.3f} -> "
              f"{last['reward']:.3f} (validation {last['validation_reward']:.3f}), feature diversity "
              f"{last['feature_diversity']:.3f}, W2 {last['w2_divergence']:.2e} ({time.perf_counter() - start:.0f} s)",
              flush=True)
        return [{"step": 0, **results["base"]}] + records

    for run in lab_runs(settings):
        first, others = settings.seeds[0], settings.seeds[1:]
        sweep = {lr: train(run, lr, first) for lr in settings.learning_rates}
        best = max(sweep, key=lambda lr: sweep[lr][-1]["validation_reward"])
        results["runs"][run.name] = {
            "group": run.group, "overrides": run.overrides, "learning_rate": best,
            "lr_sweep": {f"{lr:g}": records[-1]["validation_reward"] for lr, records in sweep.items()},
            "seeds": {str(first): sweep[best], **{str(seed): train(run, best, seed) for seed in others}},
        }
    results["seconds"] = time.perf_counter() - start
    _write_json(out / "results.json", results)
    (out / "lab_table.md").write_text(render_table(results))
    plot_results(results, out)
    return results


def _train_and_track(settings: LabSettings, run: LabRun, lr: float, seed: int, out: Path, prompts: list[str],
                     probes: dict, results: dict) -> list[dict]:
    """One (run, learning rate, seed): train in segments of ``eval_every`` steps, each a fresh Trainer resuming the
    previous segment's checkpoint, measuring the held-out probe after each and the validation reward after the
    last; the first trainer of the lab also measures the base. Returns the records (resumed ones included)."""
    from ..config import load_config
    from ..trainer import Trainer

    slug = run.name.replace(" ", "_").replace("=", "")
    run_dir = out / "runs" / slug / f"lr-{lr:g}" / f"seed-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    records_file = run_dir / "records.json"
    records = json.loads(records_file.read_text()) if records_file.is_file() else []
    done = records[-1]["step"] if records else 0
    for end in range(settings.eval_every, settings.steps + 1, settings.eval_every):
        if end <= done and results["base"] is not None:
            continue
        values = {**settings.training(), **run.overrides, "learning_rate": lr, "seed": seed,
                  "output_dir": str(run_dir), "max_steps": end, "resume_from_checkpoint": "latest"}
        with _quiet(run_dir / "train.log"):
            trainer = Trainer(load_config(None, values))
            if results["base"] is None:  # also fixes the probes' W2 inputs and base rewards, so it runs on resume too
                results["base"], base_images = probes["heldout"].measure_base(trainer)
                results["base"]["validation_reward"] = probes["validation"].measure_base(trainer)[0]["reward"]
                _save_grid(base_images, prompts, out / "samples_base.png")
                _save_grid(data_images(prompts, settings.eval_images), prompts, out / "samples_data.png")
            if end > done:
                trainer.train()
                record, images = probes["heldout"].measure(trainer)
                if end == settings.steps:
                    record["validation_reward"] = probes["validation"].reward(trainer)
                    if seed == settings.seeds[0]:
                        _save_grid(images, prompts, out / "samples" / f"{slug}_lr{lr:g}.png")
                records.append({"step": end, **record})
                _write_json(records_file, records)
        del trainer
        gc.collect()
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


def _fmt(mean: float, se: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"


def render_table(results: dict) -> str:
    """Markdown: per group, the final held-out values of every run (mean ± SE over seeds) and the base."""
    from ..evaluation.aggregate import mean_and_se

    base = results["base"]
    settings = results["settings"]
    lines = [
        f"Held-out after {settings['steps']} steps; mean ± SE over seeds {settings['seeds']}; "
        f"{settings['eval_images']} images per prompt. Each run at the learning rate (of {settings['learning_rates']}) "
        f"whose seed-{settings['seeds'][0]} run scored best on the validation seeds ({settings['val_images']} images "
        "per prompt, disjoint from the held-out ones); 'validation sweep' lists those validation rewards. "
        f"Reward: the raw `{settings['reward']}` score (the training reward without its scale); colour, shape, count, "
        "position: the `shapes` checks, in [0, 1]. "
        "Δ reward: the gain over the base; 'held-out SE': its standard error from the finite held-out set (the "
        "paired SE over held-out images, averaged over seeds) — every run is measured on the same held-out noise, "
        "so this error is shared by the runs and is not in the ± over seeds.",
        "",
    ]
    for group in ("methods", "ablation"):
        names = [name for name, run in results["runs"].items() if run["group"] == group]
        if not names:
            continue
        lines += [f"### {group}", "",
                  "| run | lr | validation sweep | reward | Δ reward | held-out SE | colour | shape | count | position "
                  "| pixel div. | feature div. | W2 div. |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| base | | {base['validation_reward']:.4f} | {base['reward']:.4f} | | | {base['colour']:.3f} | "
                  f"{base['shape']:.3f} | {base['count']:.3f} | {base['position']:.3f} | {base['pixel_diversity']:.3f} | "
                  f"{base['feature_diversity']:.3f} | 0 |"]
        for name in names:
            finals = list(results["runs"][name]["seeds"].values())

            def final(metric, digits=3, finals=finals):
                return _fmt(*mean_and_se([records[-1][metric] for records in finals]), digits)

            gain = _fmt(*mean_and_se([records[-1]["reward"] - base["reward"] for records in finals]), 4)
            heldout_se = sum(records[-1]["reward_gain_se"] for records in finals) / len(finals)
            run = results["runs"][name]
            sweep = ", ".join(f"{lr}: {value:.4f}" for lr, value in run["lr_sweep"].items())
            lines.append(f"| {name} | {run['learning_rate']:g} | {sweep} | {final('reward', 4)} | {gain} | {heldout_se:.4f} | "
                         f"{final('colour')} | {final('shape')} | {final('count')} | {final('position')} | "
                         f"{final('pixel_diversity')} | "
                         f"{final('feature_diversity')} | {_fmt(*mean_and_se([r[-1]['w2_divergence'] for r in finals]), 5)} |")
        seeds = list(results["runs"][names[0]]["seeds"])
        lines += ["", "Per seed: the final gain over the base and its held-out z (gain / held-out SE).", "",
                  "| run | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "|---|" + "---|" * len(seeds)]
        for name in names:
            cells = []
            for records in results["runs"][name]["seeds"].values():
                gain = records[-1]["reward"] - base["reward"]
                cells.append(f"{gain:+.4f} ({gain / records[-1]['reward_gain_se']:.1f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_results(results: dict, out: Path) -> list[Path]:
    """Per group: ``<group>_reward_vs_diversity.png`` (pixel and feature diversity), ``<group>_reward_vs_divergence.png``
    (trajectories of the mean over seeds from the base, ± SE bars at the end) and ``<group>_learning_curves.png``
    (reward, feature diversity and W2 divergence against steps, ± SE bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for group in ("methods", "ablation"):
        runs = {name: run for name, run in results["runs"].items() if run["group"] == group}
        if not runs:
            continue
        panels = [("reward_vs_diversity", ["pixel_diversity", "feature_diversity"]),
                  ("reward_vs_divergence", ["w2_divergence"])]
        for stem, xs in panels:
            fig, axes = plt.subplots(1, len(xs), figsize=(5.5 * len(xs), 4.2), squeeze=False)
            for ax, x_metric in zip(axes[0], xs):
                for name, run in runs.items():
                    _, x, x_se = trajectory(run, x_metric)
                    _, y, y_se = trajectory(run, "reward")
                    line, = ax.plot(x, y, marker="o", markersize=3, label=name)
                    ax.errorbar(x[-1], y[-1], xerr=x_se[-1], yerr=y_se[-1], color=line.get_color(),
                                marker="s", capsize=3)
                ax.scatter([x[0]], [y[0]], color="black", zorder=5, label="base")
                ax.set_xlabel(x_metric.replace("_", " "))
                ax.set_ylabel("held-out reward")
                ax.grid(alpha=0.3)
            axes[0][-1].legend(fontsize=7)
            fig.suptitle(f"{group}: reward vs {xs[0].split('_')[-1]} along training (base = black dot)")
            fig.tight_layout()
            written.append(out / f"{group}_{stem}.png")
            fig.savefig(written[-1], dpi=120)
            plt.close(fig)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, metric in zip(axes, ("reward", "feature_diversity", "w2_divergence")):
            for name, run in runs.items():
                steps, mean, se = trajectory(run, metric)
                line, = ax.plot(steps, mean, marker="o", markersize=3, label=name)
                if None not in se:
                    ax.fill_between(steps, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                                    color=line.get_color(), alpha=0.15)
            ax.set_xlabel("training step")
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{group}: held-out learning curves (mean ± SE over seeds)")
        fig.tight_layout()
        written.append(out / f"{group}_learning_curves.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="adrpo-lab", description="The method lab: ADRPO against ORW-CFM-W2, "
                                     "fixed-beta and RAFT on the coloured-shapes task (docs/method_lab.md).")
    parser.add_argument("--output_dir", default=LabSettings.output_dir)
    parser.add_argument("--quick", action="store_true", help="smoke scale: one seed, two steps, a few images")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {LabSettings.steps})")
    parser.add_argument("--eval_every", type=int, help=f"steps between held-out evaluations (default {LabSettings.eval_every})")
    parser.add_argument("--sampler_steps", type=int, help=f"Euler steps of rollouts and held-out samples "
                        f"(default {LabSettings.sampler_steps})")
    parser.add_argument("--ablation", choices=("none", "one", "all"),
                        help="also run the ADRPO ablation (clip range, reward scale, group size): all of it, or its "
                             "first run (default none)")
    parser.add_argument("--runs", nargs="+", metavar="NAME", help="only these runs, by their names in the table, e.g. "
                        "--runs adrpo 'raft top-1' (with --ablation: its runs too, e.g. 'adrpo reward x100')")
    parser.add_argument("--resume", action="store_true", help="continue a killed lab in --output_dir (same options)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (the plots come last: fail now, not after the runs)
    except ImportError:
        parser.error("the lab's plots need matplotlib: pip install -e '.[lab]'")
    settings = quick_settings(args.output_dir) if args.quick else LabSettings(output_dir=args.output_dir)
    for name in ("seeds", "steps", "eval_every", "sampler_steps", "ablation", "runs"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if min(settings.steps, settings.eval_every, settings.sampler_steps) < 1 or not settings.seeds:
        parser.error("--steps, --eval_every and --sampler_steps must be positive and --seeds non-empty")
    if len(set(settings.seeds)) != len(settings.seeds):
        parser.error(f"--seeds must be distinct, got {settings.seeds}")
    if settings.steps % settings.eval_every:
        parser.error(f"--steps ({settings.steps}) must be a multiple of --eval_every ({settings.eval_every})")
    try:
        lab_runs(settings)
    except ValueError as err:
        parser.error(str(err))
    results = run_lab(settings, resume=args.resume)
    print((Path(settings.output_dir) / "lab_table.md").read_text())
    print(f"[lab] {results['seconds']:.0f} s; results, table and plots in {settings.output_dir}")
    return 0
