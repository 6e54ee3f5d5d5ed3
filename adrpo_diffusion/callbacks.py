"""Hooks into :meth:`adrpo_diffusion.trainer.Trainer.train`: ``Trainer(cfg, callbacks=[...])``.

A callback sees the trainer itself (its policy, prompts, family and helpers such as ``heldout_rewards``):

    on_train_begin(trainer)            before the first step of this call (after a resume: before the next step)
    on_step_end(trainer, metrics)      after each step, once its metrics are logged and its checkpoint (if due) saved
    on_train_end(trainer, summary)     after the final checkpoint and LoRA; may add to the summary ``train`` returns

The trainer's own held-out check and sample grids are the callbacks below; the method lab's held-out probe is one
too (:mod:`adrpo_diffusion.lab.experiment`).
"""

from __future__ import annotations

import json

from .utils import paired_change


class TrainerCallback:
    """The three hooks, each doing nothing; subclass and override the ones you need."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, metrics: dict) -> None:
        pass

    def on_train_end(self, trainer, summary: dict) -> None:
        pass


def change_line(change: dict[str, float]) -> str:
    return (f"before {change['before']:.4f} -> after {change['after']:.4f} (change {change['improvement']:+.4f} +- "
            f"{change['improvement_se']:.4f} SE, paired)")


class HeldoutCheck(TrainerCallback):
    """The held-out check (``eval_prompts`` x ``eval_seeds``): the base model's rewards (adapters off) before the
    first step, the policy's after the last, on the same (prompt, seed) pairs and noise; the paired change with its
    SE, per reward part and per scorer diagnostic, goes into the summary and ``summary.json``, and the images into
    ``samples/base.png`` and ``samples/final.png``."""

    def on_train_begin(self, trainer) -> None:
        self.before = trainer.heldout_rewards(adapters=False)
        trainer.log(f"held-out reward of the base model: {self.before[0].mean().item():.4f}")

    def on_train_end(self, trainer, summary: dict) -> None:
        before, before_images, before_parts = self.before
        after, images, after_parts = trainer.heldout_rewards(adapters=True)
        change = paired_change(before, after)  # paired over the same (prompt, seed) pairs: seed noise cancels
        prompts = [trainer.prompts[i] for i, _ in trainer.heldout_pairs(trainer.cfg.eval_seeds)]
        details = trainer.scorer.details(before_images, prompts), trainer.scorer.details(images, prompts)
        summary.update({
            "heldout_samples": after.numel(),
            "heldout_prompts": "held-out split" if len(trainer.prompts) > trainer.num_training_prompts
                               else "training prompts, unseen seeds",
            "heldout_reward_before": change["before"], "heldout_reward_after": change["after"],
            "heldout_improvement": change["improvement"], "heldout_improvement_se": change["improvement_se"],
            # each part of the reward, raw (without its weight and reward_scale)
            "heldout_parts": {name: paired_change(before_parts[name], after_parts[name]) for name in after_parts},
            # the scorers' per-image diagnostics (the shapes reward: each check and the GenEval-style pass rate)
            "heldout_details": {name: paired_change(details[0][name], details[1][name]) for name in details[1]
                                if (details[0][name].isfinite() & details[1][name].isfinite()).any()},
        })
        if trainer.accelerator.is_main_process:
            trainer.save_samples(before_images, "base")  # the same prompts and noise as final.png, before training
            trainer.save_samples(images, "final")
            (trainer.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        trainer.log(f"held-out reward (mean over {len(trainer.eval_indices)} prompts x {len(trainer.cfg.eval_seeds)} "
                     f"seeds; {summary['heldout_prompts']}): {change_line(change)}")
        if len(after_parts) > 1:
            for name, part in summary["heldout_parts"].items():
                trainer.log(f"  {name} (raw, weight {trainer.scorer.weights[name]:g}): {change_line(part)}")
        for name, detail in summary["heldout_details"].items():
            trainer.log(f"  {name}: {change_line(detail)}")


class SampleGrids(TrainerCallback):
    """Every ``sample_every`` steps, ``samples/step-N.png``: the policy's images of the held-out prompts with the
    first held-out seed."""

    def on_step_end(self, trainer, metrics: dict) -> None:
        every = trainer.cfg.sample_every
        if every and trainer.step % every == 0 and trainer.accelerator.is_main_process:
            _, images, _ = trainer.heldout_rewards(seeds=trainer.cfg.eval_seeds[:1])
            trainer.save_samples(images, f"step-{trainer.step}")
