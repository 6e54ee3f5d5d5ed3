"""How noisy is one step's gradient, per choice of (noise, t) draws? On the same rollouts and rewards, the loss's
gradient is estimated twice with independent (noise, t) draws; the cosine between the two estimates measures how
much of the gradient is signal (1: the draws do not matter; 0: noise). Compared: ``shared_noise`` off/on,
``timesteps_per_sample`` 1 and 4 (stratified), ``time_sampling`` uniform and sampler. Reports the mean cosine over
``--batches`` rollout batches with its standard error. BENCHMARKS.md quotes the output.

    python scripts/gradient_noise.py                                   # the tiny offline default (colour reward)
    python scripts/gradient_noise.py --config configs/tiny_shapes_cpu.yaml --method adrpo
"""

import argparse
import dataclasses
import tempfile

import torch

from adrpo_diffusion.config import load_config
from adrpo_diffusion.trainer import Trainer

VARIANTS = [(shared, draws, times) for times in ("uniform", "sampler") for draws in (1, 4) for shared in (False, True)]


def gradient(trainer: Trainer, plan, x1, prompts, groups, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    trainer._regress(plan, x1, prompts, groups)
    flat = torch.cat([p.grad.flatten() for p in trainer.params])
    trainer.optimizer.zero_grad(set_to_none=True)
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--method", default="adrpo")
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, {"output_dir": out, "method": args.method, "eval_prompts": 0,
                                        "time_sampling": "sampler", "max_grad_norm": 0.0})
        trainer = Trainer(cfg)
        K, total = cfg.images_per_prompt, cfg.prompts_per_step * cfg.images_per_prompt
        cosines = {variant: [] for variant in VARIANTS}
        for batch in range(args.batches):
            torch.manual_seed(batch)
            slots = trainer.sampler.draw(cfg.prompts_per_step)
            prompts = [slots[j // K] for j in range(total)]
            x1, images = trainer._policy_rollouts(prompts)
            rewards, _ = trainer._score(images, prompts)
            groups = torch.arange(total) // K
            plan = trainer.method.plan(rewards.float(), groups, 0, total)
            for shared, draws, times in VARIANTS:
                trainer.cfg = dataclasses.replace(cfg, shared_noise=shared, timesteps_per_sample=draws,
                                                  time_sampling=times)
                a, b = (gradient(trainer, plan, x1, prompts, groups, 10_000 * batch + k) for k in (1, 2))
                cosines[(shared, draws, times)].append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
    print(f"{args.config}, method {args.method}, {args.batches} rollout batches of {total} images "
          f"({cfg.train_batch_size} per micro-batch): cosine between two gradient estimates, mean ± SE")
    print("| time_sampling | timesteps_per_sample | shared_noise | cosine |")
    print("|---|---|---|---|")
    for (shared, draws, times), values in cosines.items():
        mean = sum(values) / len(values)
        se = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5
        print(f"| {times} | {draws} | {shared} | {mean:.3f} ± {se:.3f} |")


if __name__ == "__main__":
    main()
