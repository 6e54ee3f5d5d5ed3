"""Euler against Heun (diffusers' FlowMatchHeunDiscreteScheduler) rollouts of the method lab's base
(builtin:tiny-sd3-shapes, 32 px, no CFG) on the same noise: latent error against a 200-step Euler solution and the
colour reward, for 12 prompts x 8 seeds. A Heun step costs two transformer forwards (the last one), so Heun at N
steps costs 2N - 1 forwards. BENCHMARKS.md quotes the output.

    python scripts/solver_comparison.py
"""

import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from adrpo_diffusion.families import load_family
from adrpo_diffusion.prompts import load_prompts
from adrpo_diffusion.scorers import build_scorer
from adrpo_diffusion.seeds import image_generators

SEEDS_PER_PROMPT = 8
RUNS = [("euler", 6), ("heun", 4), ("euler", 12), ("heun", 6), ("heun", 7), ("euler", 24), ("heun", 12)]


def main() -> None:
    family = load_family("builtin:tiny-sd3-shapes")
    family.pipe.set_progress_bar_config(disable=True)
    prompts = load_prompts("prompts/shapes_colour.txt")
    cache = family.encode_prompts(prompts, "cpu", torch.float32, 8)
    indices = [i for i in range(len(prompts)) for _ in range(SEEDS_PER_PROMPT)]
    images = [(0, i, j) for i in range(len(prompts)) for j in range(SEEDS_PER_PROMPT)]  # image j of prompt i, seed 0
    scorer, euler_config = build_scorer("color"), family.pipe.scheduler.config

    def rollouts(solver: str, steps: int):
        scheduler = FlowMatchHeunDiscreteScheduler if solver == "heun" else FlowMatchEulerDiscreteScheduler
        family.pipe.scheduler = scheduler.from_config(euler_config)
        start = time.perf_counter()
        x1 = family.sample(cache, indices, num_inference_steps=steps, resolution=32, batch_size=len(indices),
                           generators=image_generators(images))
        seconds = time.perf_counter() - start
        return x1, scorer.score(family.decode(x1, len(indices)), [prompts[i] for i in indices]), seconds

    reference, reference_reward, _ = rollouts("euler", 200)
    print(f"reference: euler 200 steps, reward {reference_reward.mean():.4f}")
    print("| solver | steps | forwards | relative latent RMSE | reward - reference (± SE) | seconds |")
    print("|---|---|---|---|---|---|")
    for solver, steps in RUNS:
        x1, reward, seconds = rollouts(solver, steps)
        error = ((x1 - reference).pow(2).mean() / reference.pow(2).mean()).sqrt()
        gap = reward - reference_reward
        forwards = steps if solver == "euler" else 2 * steps - 1
        print(f"| {solver} | {steps} | {forwards} | {error:.3f} | {gap.mean():+.4f} ± {gap.std() / len(gap) ** 0.5:.4f} "
              f"| {seconds:.2f} |")


if __name__ == "__main__":
    main()
