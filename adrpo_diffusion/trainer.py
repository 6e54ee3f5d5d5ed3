"""The training loop: the paper's Algorithm 1, one iteration per step.

    for step in 1..max_steps:
        1. draw P prompts; sample K images each from the CURRENT policy (ODE, LoRA on); keep x1
        2. reward R = scale * scorer(decode(x1), prompt)
        3. gather R over processes; the method turns the whole batch's rewards into a training plan
           (ADRPO: every sample, A = clip(R - group mean), w_fm = A, w_w2 = beta0 - A; DPO: winner/loser pairs)
        4. fresh noise and t per sample (per pair for DPO); minimise the method's loss, for ADRPO
           mean_i[w_fm_i ||v_theta - target||^2 + w_w2_i ||v_theta - v_ref||^2], with v_ref the same transformer
           with adapters disabled, under no_grad
        5. methods with moving copies of the policy (DiffusionNFT's old policy, AWM's and ADRPO's EMA anchor) update
           them: copy = d copy + (1 - d) policy
        (4 and 5 run updates_per_rollout times on the same rollouts, 1 by default: on-policy)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .advantages import decoupled_signal
from .callbacks import HeldoutCheck, SampleGrids, TrainerCallback
from .checkpoint import (
    CheckpointError,
    check_rng_state,
    checkpoint_step,
    list_checkpoints,
    load_lora_into,
    load_state_dicts,
    resolve_resume,
    run_files,
    save_checkpoint,
    save_state_dicts,
    unsafe_file_error,
)
from .config import TrainConfig
from .families import AdapterCopies, MergedLoRA, ModelFamily, adapters_off, check_model_source, load_family
from .faults import NonFiniteLossError, ProcessLost, RewardFailed, StopRequest, TrainingStopped, write_failed
from .losses import flow_sample, sample_times
from .methods import FlowBatch, Method, build_method, plan_on_finite_groups
from .prompts import PromptSampler, split_prompts
from .scorers import WeightedReward, build_reward, check_reward, check_reward_sources
from .seeds import image_generators
from .utils import image_grid


def _collective_failure(err: RuntimeError) -> bool:
    """Whether ``err`` is a collective operation that failed (gloo raises plain RuntimeErrors naming itself)."""
    return isinstance(err, torch.distributed.DistError) or any(
        text in str(err) for text in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer"))


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a stop signal on another process"


def _tracker(report_to: str) -> str | None:
    """wandb when asked for and installed, else tensorboard when installed, else none (metrics.jsonl only)."""
    import importlib.util

    if report_to == "wandb":
        if importlib.util.find_spec("wandb"):
            return "wandb"
        print("[adrpo] wandb is not installed; falling back to tensorboard (pip install wandb to use it).")
        report_to = "tensorboard"
    if report_to == "tensorboard":
        return "tensorboard" if importlib.util.find_spec("tensorboard") else None
    return None


def _flat_config(cfg: TrainConfig) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in dataclasses.asdict(cfg).items()}


def eval_prompt_indices(num_prompts: int, count: int) -> list[int]:
    """A fixed, evenly spread subset of the prompt list for held-out evaluation."""
    count = min(count, num_prompts)
    return sorted({round(i * num_prompts / count) for i in range(count)}) if count else []


def micro_batch_loss(method: Method, family: ModelFamily, model, anchors: dict, x1, noise, t, cond, values):
    """The loss of one micro-batch: ``(x_sigma, sigma, target)`` from the rollout latents, noise and t
    (:func:`.losses.flow_sample`) and the family's timestep at ``sigma``; each anchor's velocity
    ``anchors[name](x_sigma, timestep, cond)`` (:meth:`ModelFamily.reference`: the base with adapters off, or a copy
    of the policy; no gradient); ``v_theta`` from the policy ``model``; then the method's loss on that
    :class:`.methods.FlowBatch`. Returns ``(loss, parts)``."""
    x_sigma, sigma, target = flow_sample(x1, noise, t)
    timestep = family.timestep(sigma)
    velocities = {name: anchor(x_sigma, timestep, cond) for name, anchor in anchors.items()}
    v_theta = family.velocity(model, x_sigma, timestep, cond)
    return method.loss(FlowBatch(x1, x_sigma, sigma, target, v_theta, velocities), values)


class Trainer:
    """``Trainer(cfg, callbacks=[...]).train()``: the input checks, then the accelerator, the models and the
    optimizer, then a new run or the resumed one, each in its own method below; :meth:`train` is Algorithm 1.
    ``callbacks`` (:mod:`.callbacks`) run after the trainer's own: the held-out check (``eval_prompts`` > 0) and the
    sample grids (``sample_every`` > 0).

    The model and the reward are the config's (``pretrained_model``, ``reward``) unless given built:

    - ``family``: a :class:`~.families.ModelFamily` loaded without LoRA, in the run's weight dtype (e.g.
      ``load_family(...)``). The trainer adds its LoRA to that pipeline's transformer, so give each Trainer its own.
      ``cfg.pretrained_model`` should still name it: it is what config.json, the checkpoints and a model card record.
    - ``scorer``: a :class:`~.scorers.Scorer` (any object with ``score(images, prompts)``; ``details`` and
      ``check_prompts`` are used where it has them), the whole reward; ``cfg.reward`` and ``reward_options`` are then
      not read, and the held-out check logs the reward under the name ``reward``."""

    def __init__(self, cfg: TrainConfig, *, family: ModelFamily | None = None, scorer=None,
                 callbacks: Sequence[TrainerCallback] = ()):
        self.cfg, self._given_family, self._given_scorer = cfg, family, scorer
        self.callbacks = [*([HeldoutCheck()] if cfg.eval_prompts else []), *([SampleGrids()] if cfg.sample_every else []),
                          *callbacks]
        optimizer_cls, previous_run = self._check_inputs()
        self._start_accelerator()
        self._load_models()
        self._build_optimizer(optimizer_cls)
        self._start_or_resume(previous_run)

    def _check_inputs(self) -> tuple[type, list[Path]]:
        """Everything that can fail without a model; returns the optimizer class and the files of a previous run in
        ``output_dir``."""
        cfg = self.cfg
        # self.prompts: the training split, then the held-out split (heldout_fraction > 0), which only the held-out
        # check samples; without a held-out split that check uses training prompts with unseen seeds.
        training, heldout = split_prompts(cfg.prompt_file, cfg.heldout_fraction)
        self.prompts, self.num_training_prompts = training + heldout, len(training)
        if self._given_scorer is None:
            check_reward(cfg.reward, cfg.reward_options, self.prompts)
            check_reward_sources(cfg.reward, cfg.reward_options)
        elif hasattr(self._given_scorer, "check_prompts"):
            self._given_scorer.check_prompts(self.prompts)
        if self._given_family is None:
            check_model_source(cfg.pretrained_model)
        self.output_dir = Path(cfg.output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        previous_run = run_files(self.output_dir)
        if previous_run and cfg.resume_from_checkpoint is None and not cfg.overwrite_output_dir:
            raise FileExistsError(
                f"output_dir {self.output_dir} holds another run ({', '.join(p.name for p in previous_run)}). Continue it "
                "with --resume_from_checkpoint latest, replace it with --overwrite_output_dir true (deletes those files "
                "first), or choose another --output_dir."
            )
        optimizer_cls = torch.optim.AdamW
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ImportError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
            optimizer_cls = bnb.optim.AdamW8bit
        return optimizer_cls, previous_run

    def _start_accelerator(self) -> None:
        """The accelerator, the checks that need the number of processes, the method, the checkpoint to resume and
        the seeds."""
        cfg = self.cfg
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = acc = Accelerator(
            cpu=not torch.cuda.is_available(),  # without it, torchrun on CPUs gives N independent processes
            mixed_precision=mixed, log_with=_tracker(cfg.report_to),
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        if (cfg.prompts_per_step * cfg.images_per_prompt) % acc.num_processes:
            raise ValueError(
                f"prompts_per_step * images_per_prompt = {cfg.prompts_per_step * cfg.images_per_prompt} must be "
                f"divisible by the number of processes ({acc.num_processes})."
            )
        self.method = build_method(cfg.method, cfg.method_options, cfg.images_per_prompt)
        n_local = cfg.prompts_per_step * cfg.images_per_prompt // acc.num_processes
        if self.method.whole_groups_per_process and n_local % cfg.images_per_prompt:
            raise ValueError(
                f"method {cfg.method} pairs samples inside a process, so each process must hold whole prompt groups: "
                f"its {n_local} rollouts are not a multiple of images_per_prompt ({cfg.images_per_prompt}). Make "
                f"prompts_per_step ({cfg.prompts_per_step}) a multiple of the number of processes ({acc.num_processes})."
            )
        self.resume_dir = resolve_resume(cfg.resume_from_checkpoint, self.checkpoints_dir, dataclasses.asdict(cfg), self.log)
        set_seed(cfg.seed, device_specific=True)  # different rollouts on each process
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)

    def _load_models(self) -> None:
        """The reward model, then the pipeline (frozen, in ``weight_dtype``), the prompt embeddings and the LoRA
        (fp32), and the method's moving copies of the policy."""
        cfg, acc = self.cfg, self.accelerator
        # The reward model first: if its weights are missing, say so before the large download/load.
        given = self._given_scorer
        self.scorer = build_reward(cfg.reward, cfg.reward_options) if given is None else WeightedReward.of(reward=given)
        self.scorer.to(acc.device)
        self.family = family = self._given_family or load_family(
            cfg.pretrained_model, dtype=self.weight_dtype, guidance_scale=cfg.guidance_scale, drop_t5=cfg.drop_t5)
        pipe = family.pipe
        pipe.set_progress_bar_config(disable=True)
        pipe.to(acc.device)
        for module in family.modules():
            module.requires_grad_(False)
        n_train, n_heldout = self.num_training_prompts, len(self.prompts) - self.num_training_prompts
        self.eval_indices = ([n_train + i for i in eval_prompt_indices(n_heldout, cfg.eval_prompts)] if n_heldout
                             else eval_prompt_indices(n_train, cfg.eval_prompts))
        self.cache = family.encode_prompts(self.prompts, acc.device, self.weight_dtype, cfg.max_sequence_length)
        family.free_text_encoders()  # freed at once: nothing else refers to them (tests/test_families.py)
        # time_sampling: sampler trains at the times where the rollouts evaluate the transformer (t = 1 - sigma)
        self.sampler_t = (1.0 - family.sampler_sigmas(self.cache, cfg.num_inference_steps, cfg.resolution)
                          if cfg.time_sampling == "sampler" else None)

        self.transformer = pipe.transformer
        self.lora_config = family.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        from diffusers.training_utils import cast_training_params

        cast_training_params(self.transformer, dtype=torch.float32)
        # The method's moving copies of the policy: extra adapters of the LoRA's shape (no copy of the base weights).
        self.copies = AdapterCopies(self.transformer, self.lora_config, self.method.copies()) if self.method.copies() else None
        if cfg.compile_transformer:
            mode = None if cfg.compile_mode == "default" else cfg.compile_mode  # other backends than inductor take no mode
            family.compile_repeated_blocks(backend=cfg.compile_backend, mode=mode, dynamic=True)
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.merged_lora = MergedLoRA(self.transformer) if cfg.rollout_merge_lora or cfg.anchor_merge_lora else None

    def _build_optimizer(self, optimizer_cls: type) -> None:
        """The optimizer and learning-rate schedule, the prompt sampler, and the checkpoint hooks that save them."""
        cfg, acc = self.cfg, self.accelerator
        optimizer = optimizer_cls(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        from diffusers.optimization import get_scheduler

        # Not passed to accelerator.prepare, which would step it once per process; it steps once per applied update.
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_steps * cfg.updates_per_rollout)
        self.model, self.optimizer = acc.prepare(self.transformer, optimizer)
        self.sampler = PromptSampler(self.num_training_prompts, cfg.seed)
        # Saved and loaded by the hooks below, not registered with accelerate, which unpickles registered objects
        # with weights_only=False: a checkpoint must not be able to run code (checkpoint.load_state_dicts).
        self.state_objects = {"lr_scheduler": self.lr_scheduler, "prompt_sampler": self.sampler,
                              **({"policy_copies": self.copies} if self.copies else {})}
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

    def _start_or_resume(self, previous_run: list[Path]) -> None:
        """The checkpoint's state loaded (resume), or ``output_dir`` replaced (a new run); then the trackers."""
        cfg, acc = self.cfg, self.accelerator
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._warned_nonfinite_reward = False
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.log(f"method: {self.method}")
        if self.resume_dir is not None:
            if any(self.resume_dir.glob("custom_checkpoint_*.pkl")):
                raise CheckpointError(f"{self.resume_dir} was written by an earlier version of adrpo_diffusion, whose "
                                      "states accelerate unpickles without weights_only (a crafted file could run code): "
                                      "resume it with that version, or start the run over.")
            try:
                acc.load_state(str(self.resume_dir))
            except pickle.UnpicklingError as err:  # accelerate's torch.load(weights_only=True) of its own files
                raise unsafe_file_error(self.resume_dir, err) from None
            self.step = checkpoint_step(self.resume_dir)
            self.log(f"resumed from {self.resume_dir} at step {self.step}")
        elif cfg.resume_from_checkpoint == "latest":
            self.log("no checkpoint found; starting a new run")
        if acc.is_main_process:  # the run starts: only now are the output_dir's files replaced
            if cfg.overwrite_output_dir and cfg.resume_from_checkpoint is None:
                for path in previous_run:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            (self.output_dir / "summary.json").unlink(missing_ok=True)  # written again when this run ends
            self._truncate_metrics(self.step)
        acc.init_trackers("adrpo", config=_flat_config(cfg))

    # ------------------------------------------------------------------ checkpoint hooks (LoRA only, not 2B weights)
    def _save_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            self.family.export_lora(self.accelerator.unwrap_model(self.model), self.lora_config, output_dir)
            save_state_dicts(self.state_objects, output_dir)
        weights.clear()

    def _load_hook(self, models, input_dir):
        models.clear()
        load_lora_into(self.accelerator.unwrap_model(self.model), input_dir)
        load_state_dicts(self.state_objects, input_dir)
        check_rng_state(input_dir, self.accelerator.process_index)

    # ------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        """Print ``[adrpo] message`` on the main process only."""
        if self.accelerator.is_main_process:
            print(f"[adrpo] {message}", flush=True)

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop metric lines of steps the checkpoint does not contain (they will be redone)."""
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _policy_rollouts(self, indices: list[int], generators=None, adapters: bool = True,
                         copy: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
        """Final latents and decoded images of the policy (``adapters=False``: of the base model; ``copy``: of one of
        the method's copies of the policy instead, e.g. DiffusionNFT's old policy)."""
        cfg = self.cfg
        model = contextlib.ExitStack()
        if not adapters:
            model.enter_context(adapters_off(self.accelerator.unwrap_model(self.model)))
        else:
            if copy != "default":
                model.enter_context(self.copies.active(copy))
            if cfg.rollout_merge_lora:
                model.enter_context(self.merged_lora(self._rounding_generator()))  # merges the active adapter
        self.model.eval()  # rollouts in inference mode (the train step sets train mode); one compiled graph each
        with model, self.accelerator.autocast():
            x1 = self.family.sample(self.cache, indices, num_inference_steps=cfg.num_inference_steps,
                                    resolution=cfg.resolution, batch_size=cfg.rollout_batch_size, generators=generators)
            images = self.family.decode(x1, cfg.rollout_batch_size)
        return x1, images

    def _rounding_generator(self, stream: int = 0) -> torch.Generator:
        """The merged LoRA's rounding noise (bf16; :class:`.families.MergedLoRA`) of this step's rollouts (stream 0) or
        of its update ``stream - 1``'s merged copies: seeded by (seed, step, stream), so a resumed run draws it again."""
        seed = self.cfg.seed * 1_000_003 + self.step + (stream << 32)
        return torch.Generator(self.accelerator.device).manual_seed(seed)

    def _score(self, images: torch.Tensor, indices: list[int], components: bool = False):
        """The reward ``reward_scale * sum_k w_k scorer_k(image, prompt)`` of each image, each part's raw score and,
        with ``components``, the reward's components ``[(w, c)]`` for decoupled normalisation
        (:meth:`.scorers.WeightedReward.score_checks`; else none)."""
        prompts = [self.prompts[i] for i in indices]
        parts, comps = (self.scorer.score_checks(images, prompts) if components
                        else (self.scorer.score_parts(images, prompts), []))
        device = self.accelerator.device
        return (self.scorer.combine(parts).to(device) * self.cfg.reward_scale, {k: v.to(device) for k, v in parts.items()},
                [(weight, c.to(device)) for weight, c in comps])

    @torch.no_grad()
    def heldout_rewards(self, adapters: bool = True, seeds=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Rewards, images and each reward part's raw scores of the held-out (prompt, seed) pairs; seeded generators,
        global RNG untouched."""
        pairs = self.heldout_pairs(self.cfg.eval_seeds if seeds is None else seeds)
        if not pairs:
            return torch.zeros(0), torch.zeros(0), {}
        generators = image_generators((s, i, 0) for i, s in pairs)  # the one held-out seed scheme (seeds.py)
        _, images = self._policy_rollouts([i for i, _ in pairs], generators, adapters)
        rewards, parts, _ = self._score(images, [i for i, _ in pairs])
        return rewards.cpu(), images, {k: v.cpu() for k, v in parts.items()}

    def heldout_pairs(self, seeds) -> list[tuple[int, int]]:
        """The held-out (prompt index, seed) pairs, in the order of :meth:`heldout_rewards`' outputs."""
        return [(i, s) for s in seeds for i in self.eval_indices]

    def save_samples(self, images: torch.Tensor, name: str) -> None:
        """``samples/<name>.png``: held-out images (seed-major, as :meth:`heldout_rewards` returns them) in a grid of
        one row per held-out prompt and one column per seed."""
        if not len(images):  # eval_prompts: 0
            return
        (self.output_dir / "samples").mkdir(parents=True, exist_ok=True)
        prompts = [self.prompts[i] for i in self.eval_indices]
        by_prompt = images.unflatten(0, (-1, len(prompts))).transpose(0, 1).flatten(0, 1)  # one row per prompt
        grid = image_grid(by_prompt, cols=len(images) // len(prompts), labels=prompts,
                          column_labels=[f"seed {seed}" for seed in self.cfg.eval_seeds])
        grid.save(self.output_dir / "samples" / f"{name}.png")

    # ------------------------------------------------------------------ one iteration
    def train_step(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        K, world, rank = cfg.images_per_prompt, acc.num_processes, acc.process_index
        total = cfg.prompts_per_step * K
        n_local = total // world

        # 1. P prompts (identical on every process), K rollouts each; this process takes its slice.
        slots = self.sampler.draw(cfg.prompts_per_step)
        global_prompt = [slots[j // K] for j in range(total)]
        global_group = torch.arange(total, device=acc.device) // K
        local_prompt = global_prompt[rank * n_local : (rank + 1) * n_local]
        t0 = time.perf_counter()
        x1, images = self._policy_rollouts(local_prompt, copy=self.method.rollout_adapter)
        t1 = time.perf_counter()

        # 2. rewards; 3. the method's plan from the whole (gathered) batch, so every group is complete; groups with
        # a NaN or inf reward are left out. With decoupled_normalization the plan ranks the signal of
        # advantages.decoupled_signal instead of the reward (each part standardised within its group first).
        try:
            rewards, parts, components = self._score(images, local_prompt, components=cfg.decoupled_normalization > 0)
            failure = None
        except Exception as err:  # noqa: BLE001  (any error of a user's reward stops the run cleanly)
            failure = err
        if self._any_process(failure is not None)[0]:  # every process stops, not only the one whose reward raised
            cause = f"{type(failure).__name__}: {failure}" if failure else "it raised on another process"
            raise RewardFailed(f"the reward failed at step {self.step + 1}: {cause}") from failure
        all_rewards = acc.gather(rewards.float())
        part_means = {f"reward_{name}": acc.gather(part.float()).nanmean().item() for name, part in parts.items()}
        signal = all_rewards
        if cfg.decoupled_normalization:
            signal = decoupled_signal(all_rewards, [(w, acc.gather(c.float())) for w, c in components], global_group,
                                      cfg.decoupled_normalization)
        plan, dropped = plan_on_finite_groups(self.method, signal, global_group, rank, n_local)
        valid_rewards = all_rewards[torch.isfinite(all_rewards)]
        t2 = time.perf_counter()

        # 4. flow-matching regression with fresh noise and t, accumulated into one update (none when the method found
        # nothing to train on anywhere, e.g. DPO with every group's rewards equal); updates_per_rollout updates on
        # these rollouts, each with its own draws. 5. After each, the method's copies of the policy follow it:
        # copy = d copy + (1 - d) policy.
        groups = (rank * n_local + torch.arange(n_local)) // K  # prompt group of each local rollout
        sums, grad_norms, skipped = {}, [], 0
        for update in range(cfg.updates_per_rollout):
            parts, grad_norm = (self._regress(plan, x1, local_prompt, groups, update) if plan.global_units
                                else ({}, torch.zeros(())))
            # A non-finite loss or gradient anywhere, or no group with finite rewards, skips the update everywhere.
            ok = dropped < total and math.isfinite(parts.get("loss", 0.0)) and bool(grad_norm.isfinite())
            finite = bool(acc.gather(torch.tensor([float(ok)], device=acc.device)).min().item())
            if finite and plan.global_units:
                self.optimizer.step()
                self.lr_scheduler.step()  # the schedule counts applied updates
            updates_done = self.step * cfg.updates_per_rollout + update + 1
            decays = {name: self.method.copy_decay(name, updates_done) for name in self.method.copies()}
            for name, decay in decays.items():
                self.copies.update(name, decay)
            if finite:
                self.nonfinite_in_a_row = 0
            else:
                self.nonfinite_in_a_row += 1
                self.nonfinite_total += 1
                skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value / cfg.updates_per_rollout
            grad_norms.append(grad_norm.item())
        t3 = time.perf_counter()

        losses = {}
        if sums:
            gathered = acc.gather(torch.tensor(list(sums.values()), device=acc.device).view(1, -1))
            losses = dict(zip(sums, gathered.view(world, -1).mean(0).tolist()))
        return {
            "reward_mean": valid_rewards.mean().item() if len(valid_rewards) else math.nan,
            "reward_std": valid_rewards.std().item() if len(valid_rewards) > 1 else math.nan,
            "reward_nonfinite": int(total - len(valid_rewards)),
            "samples_dropped": dropped,
            **part_means,
            **plan.metrics,
            **losses,
            **{f"{name}_decay": decay for name, decay in decays.items()},
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "skipped_nonfinite": skipped,
            "skipped_empty": int(not plan.global_units and dropped < total),
            "nonfinite_total": self.nonfinite_total,
            "seconds_rollout": t1 - t0,
            "seconds_reward": t2 - t1,
            "seconds_train": t3 - t2,
        }

    def _regress(self, plan, x1, local_prompt, groups, update: int = 0) -> tuple[dict, torch.Tensor]:
        """Step 4: fresh noise and t per unit of the plan (a sample, or a DPO pair sharing them; with ``shared_noise``,
        per prompt group), ``timesteps_per_sample`` draws each; micro-batches of whole units, each loss (a mean over
        its units) backpropagated times its share ``units * processes / all units of all processes`` (DDP averages
        over processes), gradients all-reduced on the last one; ``update``: which of the step's updates this is (it
        seeds the merged copies' rounding). Returns the share-weighted sums of the loss parts and the (clipped)
        gradient norm."""
        cfg, acc = self.cfg, self.accelerator
        units = plan.rows.view(-1, plan.unit)
        placeholder = not len(units)
        if placeholder:  # no unit here but some elsewhere: a zero-weighted one joins the synchronised backward
            units = torch.zeros(1, plan.unit, dtype=torch.long)
        draws = cfg.timesteps_per_sample
        # which (noise, t) draw each unit takes: its own, or its group's; a fresh one for each of the ``draws`` repeats
        owner = groups[units[:, 0]] if cfg.shared_noise else torch.arange(len(units))
        owner = torch.unique(owner, return_inverse=True)[1]
        n_owners = int(owner.max()) + 1
        owner = (owner + n_owners * torch.arange(draws)[:, None]).flatten()
        units = units.repeat(draws, 1)
        total = plan.global_units * draws
        rows = units.flatten()
        cond = self.cache.select([local_prompt[i] for i in rows.tolist()], acc.device, self.weight_dtype)
        x1_rep = x1[rows]
        values = {k: v[rows] for k, v in plan.values.items()}
        noise = torch.randn((n_owners * draws, *x1.shape[1:]), dtype=torch.float32).to(acc.device, x1.dtype)
        t = sample_times(n_owners, cfg.time_sampling, draws, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                         sampler_t=self.sampler_t).flatten().to(acc.device)  # stratified over each owner's draws
        noise, t = noise[owner].repeat_interleave(plan.unit, dim=0), t[owner].repeat_interleave(plan.unit)
        unwrapped = acc.unwrap_model(self.model)
        generator = self._rounding_generator(1 + update) if cfg.anchor_merge_lora else None
        anchors = {name: self.family.reference(unwrapped) if name == "reference" else
                   self.family.reference(unwrapped, context=lambda _, name=name: self._as_copy(name, generator))
                   for name in plan.anchors}
        self.model.train()
        sums = {}
        per_batch = max(1, cfg.train_batch_size // plan.unit)
        starts = list(range(0, len(units), per_batch))
        for k, start in enumerate(starts):
            sl = slice(start * plan.unit, (start + per_batch) * plan.unit)
            # gradients are all-reduced once, on the last micro-batch
            sync = acc.no_sync(self.model) if k < len(starts) - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                loss, parts = micro_batch_loss(self.method, self.family, self.model, anchors, x1_rep[sl], noise[sl],
                                               t[sl], {k: v[sl] for k, v in cond.items()},
                                               {key: v[sl] for key, v in values.items()})
                share = 0.0 if placeholder else x1_rep[sl].shape[0] // plan.unit * acc.num_processes / total
                acc.backward(loss * share)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value * share
        sums = {k: float(v) for k, v in sums.items()}  # one device sync per step, not per micro-batch
        return sums, acc.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)

    @contextlib.contextmanager
    def _as_copy(self, name: str, generator: torch.Generator | None):
        """The transformer runs as the method's copy ``name``; with ``anchor_merge_lora`` its LoRA folded into the base
        weights (:class:`.families.MergedLoRA`), restored on exit, before the policy's pass."""
        with self.copies.active(name), self.merged_lora(generator) if self.cfg.anchor_merge_lora else contextlib.nullcontext():
            yield

    # ------------------------------------------------------------------ the run
    def _loop(self, progress, stop: StopRequest) -> None:
        """Algorithm 1's iterations up to ``max_steps``. Before each: a stop signal on any process (every process
        stops at the same step) or ``checkpoint_every_minutes`` elapsed writes a checkpoint of the last completed
        step; the signal then ends the run (:class:`TrainingStopped`)."""
        cfg, acc = self.cfg, self.accelerator
        while self.step < cfg.max_steps:
            minutes = cfg.checkpoint_every_minutes
            stopping, due = self._any_process(stop.signum is not None,
                                              minutes > 0 and time.monotonic() - self._last_save >= 60 * minutes)
            if stopping or due:
                path = self._save_checkpoint()
                if stopping:
                    where = f"checkpoint {path}" if path else "no step was completed, nothing to save"
                    raise TrainingStopped(f"stopped by {signal_name(stop.signum)} before step {self.step + 1} ({where})",
                                          stop.signum or signal.SIGTERM)
            try:
                metrics = self.train_step()
            except RewardFailed:
                self._save_checkpoint()  # the failed step changed nothing: this is the last completed one
                raise
            self.step += 1
            metrics = {"step": self.step, **metrics}
            acc.log(metrics, step=self.step)
            if acc.is_main_process:
                with self.metrics_path.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if metrics["reward_nonfinite"] and not self._warned_nonfinite_reward:
                self._warned_nonfinite_reward = True
                self.log(f"step {self.step}: the reward was NaN or inf for {metrics['reward_nonfinite']} images; their "
                          "prompt groups were left out of the step (metrics.jsonl counts them in reward_nonfinite; this "
                          "is said once)")
            if metrics["skipped_empty"]:
                self.log(f"step {self.step}: the method found nothing to train on (e.g. DPO: every group's rewards "
                          "equal); no update")
            if metrics["skipped_nonfinite"]:
                self.log(f"step {self.step}: non-finite loss or gradient, or no prompt group with finite rewards; step "
                          f"skipped ({self.nonfinite_in_a_row} in a row)")
                if self.nonfinite_in_a_row >= cfg.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_a_row} non-finite steps in a row (step {self.step}); stopping. Lower "
                        "learning_rate, check the reward for NaN/inf, or resume from the last checkpoint."
                    )
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics.get('loss', math.nan):.4f}")
            if cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0:
                self._save_checkpoint()
            for callback in self.callbacks:
                callback.on_step_end(self, metrics)

    def _save_checkpoint(self) -> Path | None:
        """A checkpoint of the current step, unless it exists (or no step was trained); its path."""
        cfg = self.cfg
        saved = dict(list_checkpoints(self.checkpoints_dir))
        if self.step and self.step not in saved:
            saved[self.step] = save_checkpoint(self.accelerator, self.checkpoints_dir, self.step,
                                               cfg.checkpoints_total_limit, dataclasses.asdict(cfg))
            self._last_save = time.monotonic()
        return saved.get(self.step)

    def _any_process(self, *flags: bool) -> list[bool]:
        """Each flag, true when it is true on any process: one small all-reduce (none with a single process)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return list(flags)
        total = acc.reduce(torch.tensor([float(flag) for flag in flags], device=acc.device), reduction="sum")
        return [value > 0 for value in total.tolist()]

    def train(self) -> dict:
        """Algorithm 1 up to ``max_steps`` (from the resumed step), the final checkpoint and LoRA; returns the summary
        (``steps``, plus what the callbacks add: the held-out check's before/after)."""
        cfg, acc = self.cfg, self.accelerator
        from tqdm.auto import tqdm

        for callback in self.callbacks:
            callback.on_train_begin(self)
        progress = tqdm(total=cfg.max_steps, initial=self.step, desc="ADRPO steps" if cfg.method == "adrpo" else cfg.method,
                        disable=not acc.is_main_process)
        self._last_save = time.monotonic()
        with StopRequest(self.log) as stop:
            try:
                self._loop(progress, stop)
            except RuntimeError as err:  # a collective that failed: another process of the run is gone
                if acc.num_processes == 1 or not _collective_failure(err):
                    raise
                raise ProcessLost(f"another process of this run stopped (a collective failed at step {self.step + 1}: "
                                  f"{str(err).splitlines()[0]})") from err
        progress.close()

        self._save_checkpoint()
        if acc.is_main_process:
            try:
                self.family.export_lora(acc.unwrap_model(self.model), self.lora_config, self.output_dir)
            except OSError as err:
                raise write_failed(self.output_dir / "pytorch_lora_weights.safetensors", err) from err
        self.log(f"LoRA weights: {self.output_dir / 'pytorch_lora_weights.safetensors'}")
        summary = {"steps": self.step}
        for callback in self.callbacks:
            callback.on_train_end(self, summary)
        acc.end_training()
        return summary


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).train()
