"""Benchmark of one training iteration's phases and of the memory/speed levers.

Phases, timed separately (median of ``--repeats`` after one warm-up): rollout sampling (the SD3 family's
rollouts, as the trainer runs them), VAE decode, reward (CLIP score), and the train step (policy
forward/backward plus the reference forward, then the optimiser step). Reports images/s per phase, the train
step's samples/s, peak memory, and model FLOP utilisation (MFU).

FLOPs are counted from the transformer's config and token counts (:func:`transformer_flops`, checked
against ``torch.utils.flop_counter`` in the tests). MFU counts model FLOPs only: the sampler does
``steps x (2 with CFG)`` forwards per image; the train step does the policy forward, its backward (the base
weights are frozen, so only input gradients: 1x the linear FLOPs and 2x the attention FLOPs), and the
reference forward. Recomputation under gradient checkpointing is not counted as useful work.

``--arch sd3-medium`` builds the FULL SD3-medium transformer and VAE (and, for the prompt-caching lever, the
three text encoders) at random initialisation: the same FLOPs and memory as the real weights, no download.
Prompt embeddings are random tensors of the right shapes.

``--e2e`` benchmarks the real trainer end to end instead (:mod:`adrpo_diffusion.benchmark_e2e`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from .benchmark_models import (
    CLIP_BIGG,
    CLIP_L,
    PEAK_BF16_TFLOPS,
    SD3_MEDIUM_TRANSFORMER,
    SD3_VAE,
    T5_XXL,
    clip_reward_model,
    sd3_text_encoders,
    transformer_flops,
)


@dataclasses.dataclass
class Scenario:
    """One combination of levers. The default is what the 80 GB config runs."""

    name: str
    dtype: str = "bf16"  # bf16 (autocast, bf16 base weights, fp32 LoRA) or fp32
    gradient_checkpointing: bool = False
    reference: str = "adapters"  # adapters (same weights, LoRA disabled) or copy (a second transformer)
    cfg: str = "batched"  # batched (cond + uncond in one forward, as diffusers does) or split (two forwards)
    attention: str = "sdpa"  # sdpa (fused flash/efficient kernels) or math (unfused reference kernel)
    compile: bool = False  # torch.compile the transformer
    batch_size: int = 8  # rollout images per forward batch
    train_batch_size: int = 8  # samples per train micro-batch
    steps: int = 20  # sampler steps
    phases: tuple = ("sample", "decode", "reward", "train")


def default_scenarios(device: str) -> list[Scenario]:
    if device == "cpu":
        return [
            Scenario("default", dtype="fp32"),
            Scenario("grad-checkpointing", dtype="fp32", gradient_checkpointing=True, phases=("train",)),
            Scenario("reference-copy", dtype="fp32", reference="copy", phases=("train",)),
            Scenario("cfg-split", dtype="fp32", cfg="split", phases=("sample",)),
            Scenario("attention-math", dtype="fp32", attention="math", phases=("sample", "train")),
            Scenario("steps-10", dtype="fp32", steps=10, phases=("sample",)),
            Scenario("batch-16", dtype="fp32", batch_size=16, train_batch_size=16, phases=("sample", "train")),
        ]
    return [
        Scenario("default"),
        Scenario("24gb-config", gradient_checkpointing=True, batch_size=4, train_batch_size=2),
        Scenario("grad-checkpointing", gradient_checkpointing=True, phases=("train",)),
        Scenario("reference-copy", reference="copy", phases=("train",)),
        Scenario("cfg-split", cfg="split", phases=("sample",)),
        Scenario("attention-math", attention="math", phases=("sample", "train")),
        Scenario("batch-16", batch_size=16, train_batch_size=16, phases=("sample", "train")),
        Scenario("steps-10", steps=10, phases=("sample",)),
        Scenario("fp32", dtype="fp32", batch_size=4, train_batch_size=4, phases=("sample", "train")),
        Scenario("compile", compile=True, phases=("sample", "train")),
        # the best combination of the levers above, sampling and training measured separately
        Scenario("best-sample", compile=True, batch_size=16, phases=("sample",)),
        Scenario("best-train", compile=True, train_batch_size=16, phases=("train",)),
    ]


class Bench:
    """The models of one benchmark run, built once and shared by the scenarios."""

    def __init__(self, arch: str, device: str, resolution: int, lora_rank: int, text_encoders: bool):
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )

        from .families import load_family
        from .families.sd3 import SD3Family

        self.device = torch.device(device)
        self.arch, self.resolution = arch, resolution
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        if arch == "tiny":
            pipe = load_family("builtin:tiny-sd3").pipe
            self.text_modules = [pipe.text_encoder, pipe.text_encoder_2]
            pipe.text_encoder = pipe.text_encoder_2 = None
            transformer, vae, scheduler = pipe.transformer, pipe.vae, pipe.scheduler
            self.text_tokens, self.max_sequence_length = 77 + 8, 8
        else:
            with self.device:
                transformer = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER).to(dtype)
                vae = AutoencoderKL(**SD3_VAE).to(dtype)
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
            self.text_modules = sd3_text_encoders([CLIP_L, CLIP_BIGG, T5_XXL], self.device, dtype) if text_encoders else []
            self.text_tokens, self.max_sequence_length = 77 + 256, 256
        transformer.to(self.device, dtype).requires_grad_(False)
        vae.to(self.device, dtype).requires_grad_(False)
        self.pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None,
                                             tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                             text_encoder_3=None, tokenizer_3=None)
        self.pipe.set_progress_bar_config(disable=True)
        self.family = SD3Family(self.pipe, guidance_scale=4.5)
        self.lora_config = self.family.add_lora(lora_rank, lora_rank)
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.scorer = self._reward_model()
        c = transformer.config
        self.latent_size = resolution // self.pipe.vae_scale_factor
        self.image_tokens = (self.latent_size // c.patch_size) ** 2
        self.flops = transformer_flops(c, self.image_tokens, self.text_tokens)

    def _reward_model(self):
        """The CLIP-score reward: CLIP ViT-L/14 at random init for sd3-medium, a tiny CLIP for tiny."""
        from .scorers.clip import ClipScorer

        dtype = "float16" if self.device.type == "cuda" else "float32"
        model, processor = clip_reward_model(self.arch, self.device, getattr(torch, dtype))
        return ClipScorer.from_model(model, processor, device=str(self.device), dtype=dtype, batch_size=32)

    # ------------------------------------------------------------------ helpers
    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)

    def autocast(self, scenario: Scenario):
        if scenario.dtype == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def embeddings(self, n: int, dtype) -> dict:
        """Random prompt tensors of the right shapes, as the family's prompt cache selects them."""
        c = self.transformer.config
        g = torch.Generator(device="cpu").manual_seed(n)
        embeds = torch.randn(n, self.text_tokens, c.joint_attention_dim, generator=g).to(self.device, dtype)
        pooled = torch.randn(n, c.pooled_projection_dim, generator=g).to(self.device, dtype)
        return {"embeds": embeds, "pooled": pooled}

    def timed(self, fn, repeats: int) -> float:
        fn()  # warm-up (and compilation)
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    # ------------------------------------------------------------------ phases
    def sample(self, s: Scenario, model):
        from .families import PromptCache

        dtype = self.param_dtype(s)
        cond = self.embeddings(s.batch_size, dtype)
        negative = {k: v[:1] for k, v in self.embeddings(s.batch_size + 1, dtype).items()}
        if s.cfg == "batched":
            self.pipe.transformer = model
            cache = PromptCache(cond, negative)
            return self.family.sample(cache, list(range(s.batch_size)), num_inference_steps=s.steps,
                                      resolution=self.resolution, batch_size=s.batch_size)
        # split CFG: the same Euler sampler, conditional and unconditional passes as two forwards
        self.scheduler.set_timesteps(s.steps, device=self.device)
        c = self.transformer.config
        latents = torch.randn(s.batch_size, c.in_channels, self.latent_size, self.latent_size, device=self.device, dtype=dtype)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                timestep = t.expand(s.batch_size)
                v_cond = self.family.velocity(model, latents, timestep, cond)
                v_uncond = self.family.velocity(model, latents, timestep,
                                                {k: v.expand(s.batch_size, *v.shape[1:]) for k, v in negative.items()})
                latents = self.scheduler.step(v_uncond + 4.5 * (v_cond - v_uncond), t, latents).prev_sample
        return latents

    def param_dtype(self, s: Scenario):
        return torch.bfloat16 if (s.dtype == "bf16" and self.device.type == "cuda") else torch.float32

    def run(self, s: Scenario, repeats: int) -> dict:
        from .methods import build_method
        from .trainer import micro_batch_loss

        dtype = self.param_dtype(s)
        if self.vae.dtype != dtype:
            self.transformer.to(dtype)
            for p in self.transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # LoRA stays fp32
            self.vae.to(dtype)
        if s.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()
        model = torch.compile(self.transformer) if s.compile else self.transformer
        attention = contextlib.nullcontext()
        if s.attention == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            attention = sdpa_kernel(SDPBackend.MATH)
        result = {"scenario": s.name, **dataclasses.asdict(s)}
        result["phases"] = list(s.phases)
        peak_tflops = self.peak_tflops if s.dtype == "bf16" else None
        fwd = self.flops["linear"] + self.flops["attention"]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with attention, self.autocast(s):
            if "sample" in s.phases:
                self.reset_peak()
                seconds = self.timed(lambda: self.sample(s, model), repeats)
                forwards = 2 * s.steps  # guidance 4.5: conditional and unconditional passes
                result.update(sample_images_per_s=s.batch_size / seconds, sample_seconds=seconds, sample_peak_gb=self.peak_gb(),
                              sample_tflops=forwards * fwd * s.batch_size / seconds / 1e12)
                if peak_tflops:
                    result["sample_mfu"] = result["sample_tflops"] / peak_tflops
            if "decode" in s.phases or "reward" in s.phases:
                latents = self.sample(s, model)
            if "decode" in s.phases:
                self.reset_peak()
                seconds = self.timed(lambda: self.family.decode(latents, s.batch_size), repeats)
                result.update(decode_images_per_s=s.batch_size / seconds, decode_peak_gb=self.peak_gb())
            if "reward" in s.phases:
                images = self.family.decode(latents, s.batch_size)
                prompts = ["a photo of an astronaut riding a horse"] * s.batch_size
                self.reset_peak()
                seconds = self.timed(lambda: self.scorer.score(images, prompts), repeats)
                result.update(reward_images_per_s=s.batch_size / seconds, reward_peak_gb=self.peak_gb())
            if "train" in s.phases:
                reference_model = None
                if s.reference == "copy":
                    from diffusers import SD3Transformer2DModel

                    with self.device:
                        reference_model = SD3Transformer2DModel(**self.transformer.config).to(dtype).requires_grad_(False)
                if reference_model is not None:
                    def reference(x, timestep, cond, copy=reference_model):
                        with torch.no_grad():
                            return self.family.velocity(copy, x, timestep, cond)
                else:
                    reference = self.family.reference(self.transformer)
                params = [p for p in self.transformer.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(params, lr=1e-6)
                n = s.train_batch_size
                c = self.transformer.config
                g = torch.Generator().manual_seed(1)
                x1 = torch.randn(n, c.in_channels, self.latent_size, self.latent_size, generator=g).to(self.device, dtype)
                noise = torch.randn(x1.shape, generator=g).to(self.device, dtype)
                t = torch.rand(n, generator=g).to(self.device)
                cond = self.embeddings(n, dtype)
                advantages = torch.linspace(-1, 1, n, device=self.device)
                adrpo, weights = build_method("adrpo", {}, images_per_prompt=2), {"fm": advantages, "w2": 1.0 - advantages}

                def train_step():
                    loss, _ = micro_batch_loss(adrpo, self.family, model, {"reference": reference}, x1, noise, t, cond,
                                               weights)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                self.reset_peak()
                seconds = self.timed(train_step, repeats)
                train_flops = 2 * fwd + self.flops["linear"] + 2 * self.flops["attention"]
                result.update(train_samples_per_s=n / seconds, train_seconds=seconds, train_peak_gb=self.peak_gb(),
                              train_tflops=train_flops * n / seconds / 1e12)
                if peak_tflops:
                    result["train_mfu"] = result["train_tflops"] / peak_tflops
                del optimizer, reference_model, reference
        self.transformer.disable_gradient_checkpointing()
        return result

    def text_encoding_seconds(self, prompts: int, repeats: int) -> dict:
        """What prompt caching saves: one encoding of ``prompts`` prompts with every text encoder."""
        if not self.text_modules:
            return {}
        ids77 = torch.randint(0, 500, (prompts, 77), device=self.device)
        ids_t5 = torch.randint(0, 500, (prompts, self.max_sequence_length), device=self.device)

        @torch.no_grad()
        def encode():
            for module in self.text_modules:
                module(input_ids=ids_t5 if module.__class__.__name__.startswith("T5") else ids77)

        seconds = self.timed(encode, repeats)
        gib = sum(p.numel() * p.element_size() for m in self.text_modules for p in m.parameters()) / 2**30
        return {"text_encode_seconds": seconds, "text_encode_prompts": prompts, "text_encoder_gb": gib}

    def free_text_encoders(self):
        self.text_modules = []
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def method_overhead(bench: Bench, repeats: int) -> dict:
    """Train-step time of ADRPO versus orw-cfm-w2, fixed-beta and raft on identical batches (CPU ratios)."""
    from .methods import build_method
    from .trainer import micro_batch_loss

    dtype = torch.float32
    bench.run(Scenario("warm-up", dtype="fp32", phases=("train",)), 1)  # also puts the models in fp32
    n, c = 8, bench.transformer.config
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(n, c.in_channels, bench.latent_size, bench.latent_size, generator=g).to(bench.device, dtype)
    noise, t = torch.randn(x1.shape, generator=g).to(bench.device, dtype), torch.rand(n, generator=g).to(bench.device)
    cond = bench.embeddings(n, dtype)
    rewards, groups = torch.randn(n, generator=g), torch.arange(n) // 4
    params = [p for p in bench.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    steps = {}
    for name in ("adrpo", "orw-cfm-w2", "fixed-beta", "raft"):  # every sample, one t each (DPO trains on pairs)
        method = build_method(name, {}, images_per_prompt=4)
        plan = method.plan(rewards, groups, rank=0, n_local=n)
        anchors = {"reference": bench.family.reference(bench.transformer)} if plan.needs_reference else {}

        def step(method=method, anchors=anchors, values=plan.values):
            loss, _ = micro_batch_loss(method, bench.family, bench.transformer, anchors, x1, noise, t, cond, values)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    # interleaved rounds, so that load from elsewhere on the machine hits every method alike
    times = {method: [] for method in steps}
    for _ in range(max(repeats, 5)):
        for method, step in steps.items():
            times[method].append(bench.timed(step, 1))
    seconds = {method: statistics.median(values) for method, values in times.items()}
    return {f"step_time_ratio_adrpo_over_{m}": seconds["adrpo"] / seconds[m] for m in seconds if m != "adrpo"} | {
        f"step_seconds_{m}": v for m, v in seconds.items()}


def reference_copy_memory(bench: Bench) -> dict:
    """Parameter memory of the reference as disabled adapters (0 extra) versus a second transformer copy."""
    base = [p for n, p in bench.transformer.named_parameters() if "lora_" not in n]
    lora = [p for n, p in bench.transformer.named_parameters() if "lora_" in n]
    return {"transformer_gb": sum(p.numel() * p.element_size() for p in base) / 2**30,
            "lora_gb": sum(p.numel() * p.element_size() for p in lora) / 2**30,
            "reference_copy_extra_gb": sum(p.numel() * p.element_size() for p in base) / 2**30,
            "reference_adapters_extra_gb": 0.0}


def markdown(results: list[dict]) -> str:
    columns = [("scenario", "{}"), ("sample_images_per_s", "{:.2f}"), ("sample_mfu", "{:.1%}"), ("sample_peak_gb", "{:.1f}"),
               ("decode_images_per_s", "{:.1f}"), ("reward_images_per_s", "{:.1f}"), ("train_samples_per_s", "{:.2f}"),
               ("train_mfu", "{:.1%}"), ("train_peak_gb", "{:.1f}")]
    lines = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        lines.append("| " + " | ".join(fmt.format(r[c]) if c in r else "-" for c, fmt in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--e2e" in argv:
        from .benchmark_e2e import main as e2e_main

        return e2e_main([arg for arg in argv if arg != "--e2e"])
    parser = argparse.ArgumentParser(prog="adrpo-benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "sd3-medium"], default="tiny",
                        help="the model measured: a tiny random SD3 built offline (CPU), or SD3-medium's architecture "
                             "at full size with random weights (a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device; the scenarios differ between cpu and cuda")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (None: 32 for tiny, 512 for sd3-medium)")
    parser.add_argument("--lora_rank", type=int, default=32, help="LoRA rank of the trained adapters")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each phase (the median is kept)")
    parser.add_argument("--scenarios", default="all", help="comma-separated scenario names, or all. cpu: "
                        + ", ".join(s.name for s in default_scenarios("cpu")) + "; cuda: "
                        + ", ".join(s.name for s in default_scenarios("cuda")))
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="bf16 peak of the device for MFU (None: by the device's name)")
    parser.add_argument("--time_budget", type=float, default=float("inf"),
                        help="skip the remaining scenarios after this many seconds")
    parser.add_argument("--no_text_encoders", action="store_true", help="skip the prompt-caching measurement")
    parser.add_argument("--output", default="benchmark.json", help="JSON report")
    parser.add_argument("--e2e", action="store_true", help="instead: the real trainer end to end, one config and its "
                                                           "variants (options: adrpo-benchmark --e2e --help)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    resolution = args.resolution or (32 if args.arch == "tiny" else 512)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bench = Bench(args.arch, args.device, resolution, args.lora_rank, text_encoders=not args.no_text_encoders)
    device_name = torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu"
    bench.peak_tflops = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    report = {"device": device_name, "torch": torch.__version__, "arch": args.arch, "resolution": resolution,
              "lora_rank": args.lora_rank, "image_tokens": bench.image_tokens, "text_tokens": bench.text_tokens,
              "forward_gflops_per_image": (bench.flops["linear"] + bench.flops["attention"]) / 1e9,
              "peak_tflops": bench.peak_tflops,
              "command": " ".join(["adrpo-benchmark", *argv])}
    print(json.dumps(report), flush=True)
    report["text_encoding"] = bench.text_encoding_seconds(prompts=8, repeats=args.repeats)
    bench.free_text_encoders()
    report["memory"] = reference_copy_memory(bench)
    if bench.device.type == "cpu":
        report["methods"] = method_overhead(bench, args.repeats)
    print(json.dumps({k: report[k] for k in ("text_encoding", "memory", "methods") if k in report}), flush=True)
    wanted = None if args.scenarios == "all" else set(args.scenarios.split(","))
    results = []
    for scenario in default_scenarios(bench.device.type):
        if wanted is not None and scenario.name not in wanted:
            continue
        if time.perf_counter() - start > args.time_budget:
            print(f"time budget spent: skipping {scenario.name}", flush=True)
            continue
        try:
            results.append(bench.run(scenario, args.repeats))
        except torch.OutOfMemoryError:
            results.append({"scenario": scenario.name, "error": "out of memory"})
        except Exception as err:  # one failing lever must not lose the others' numbers
            results.append({"scenario": scenario.name, "error": f"{type(err).__name__}: {err}"[:500]})
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
        report["scenarios"] = results
        Path(args.output).write_text(json.dumps(report, indent=2))  # after each scenario: nothing lost
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
