"""Rollout speed levers (issue: performance of the real trainer): each is one config key, and each leaves the
training math unchanged where it should."""

import contextlib

import pytest
import torch
from safetensors.torch import load_file

from adrpo_diffusion.config import load_config
from adrpo_diffusion.families import MergedLoRA, adapters_off, load_family
from adrpo_diffusion.families.base import round_stochastic
from adrpo_diffusion.trainer import Trainer

SMALL = dict(prompts_per_step=2, images_per_prompt=4, eval_prompts=0, sample_every=0, checkpointing_steps=1)


def test_stochastic_rounding_to_bf16_is_unbiased():
    grid = torch.tensor([1.0, -1.0, 0.0371, -3.5e-3, 250.0]).to(torch.bfloat16).float()
    ulp = torch.tensor([2.0 ** (torch.frexp(g).exponent.item() - 8) for g in grid])  # bf16 keeps 8 significant bits
    x = grid + 0.3 * ulp * grid.sign()  # 0.3 of a step above each magnitude: round-to-nearest drops it
    assert torch.equal(x.to(torch.bfloat16).float(), grid)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([round_stochastic(x, torch.bfloat16, generator).float() for _ in range(4000)])
    assert set(draws.unique().tolist()) <= set(grid.tolist()) | set((grid + ulp * grid.sign()).tolist())
    mean, se = draws.mean(0), draws.std(0) / 4000**0.5
    assert ((mean - x).abs() < 4 * se).all(), (mean - x) / ulp
    assert torch.equal(round_stochastic(grid, torch.bfloat16, generator).float(), grid)  # representable: unchanged
    assert torch.equal(round_stochastic(x, torch.float32), x)


def _with_random_lora(transformer_dir, dtype, b_scale):
    family = load_family(transformer_dir, dtype=dtype)
    torch.manual_seed(0)  # the LoRA's A matrices: not whatever the tests before left in the global generator
    family.add_lora(4, 4)
    generator = torch.Generator().manual_seed(0)
    for name, p in family.transformer.named_parameters():
        if "lora_" in name:  # fp32 adapters on a base of `dtype`, as the trainer has them
            p.data = p.data.float()
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=generator) * b_scale
    return family.transformer


def _forward(transformer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    c = transformer.config
    latents = torch.randn(2, c.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 5, c.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        return transformer(hidden_states=latents, timestep=torch.tensor([300.0, 700.0]), encoder_hidden_states=text,
                           pooled_projections=pooled, return_dict=False)[0]


def test_merged_lora_samples_the_policy_and_restores_the_base_bitwise(tiny_sd3_dir):
    transformer = _with_random_lora(tiny_sd3_dir, torch.float32, b_scale=0.05)
    policy = _forward(transformer)
    with adapters_off(transformer):
        base = _forward(transformer)
    assert (policy - base).abs().mean() > 1e-3  # the LoRA matters, so the comparison below can fail
    merged = MergedLoRA(transformer)
    weights = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    with merged():
        folded = _forward(transformer)
        assert any(not torch.equal(p, weights[n]) for n, p in transformer.named_parameters() if "base_layer" in n)
    torch.testing.assert_close(folded, policy, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, weights[n]) for n, p in transformer.named_parameters())  # base and LoRA as before
    assert torch.equal(_forward(transformer), policy)  # the adapters are on again


def test_merged_lora_keeps_deltas_below_bf16_resolution(tiny_sd3_dir):
    """With bf16 base weights, a LoRA delta below half a bf16 step rounds away when merged to nearest (the rollouts
    would sample the base model); the stochastic merge keeps it on average."""
    transformer = _with_random_lora(tiny_sd3_dir, torch.bfloat16, b_scale=1e-4)
    merged = MergedLoRA(transformer)
    layer, w0 = merged.layers[0], merged.originals[0].float()
    delta = layer.get_delta_weight("default")

    def projection(merged_weight):  # 1: the delta is there; 0: it is lost
        return ((merged_weight.float() - w0) * delta).sum() / (delta * delta).sum()

    assert projection((w0 + delta).to(torch.bfloat16)) < 0.2  # to nearest: most of the delta rounds away
    generator = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(64):  # the mean's spread over LoRA draws about 0.025: the bounds below are 4 of those away
        with merged(generator):
            draws.append(projection(layer.get_base_layer().weight))
    assert 0.9 < sum(draws) / len(draws) < 1.1, draws
    assert torch.equal(layer.get_base_layer().weight.float(), w0)


def _run(output_dir, **overrides):
    cfg = load_config("configs/tiny_cpu.yaml", {**SMALL, "output_dir": str(output_dir), **overrides})
    trainer = Trainer(cfg)
    trainer.train()
    return trainer, load_file(str(output_dir / "pytorch_lora_weights.safetensors"))


def test_anchor_merge_lora_gives_the_copys_velocity_and_restores_the_base(tmp_path, tiny_sd3_dir):
    """With anchor_merge_lora the moving anchor's velocity is the copy's own (its LoRA folded in, not the policy's),
    and the policy's pass afterwards sees the base weights bitwise as before."""
    cfg = load_config("configs/tiny_cpu.yaml", {**SMALL, "output_dir": str(tmp_path / "run"), "anchor_merge_lora": True})
    trainer = Trainer(cfg)  # adrpo with the EMA anchor: one copy, "ema"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, target in trainer.copies.pairs["ema"]:  # a copy far from the policy (whose LoRA B is still zero)
            target.copy_(torch.randn(target.shape, generator=generator) * 0.05)
    family, transformer = trainer.family, trainer.transformer
    latents = torch.randn(3, transformer.config.in_channels, 8, 8, generator=generator)
    timestep, cond = family.timestep(torch.tensor([0.2, 0.5, 0.9])), trainer.cache.select([0, 1, 2], "cpu", torch.float32)
    weights = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    policy = family.reference(transformer, context=lambda _: contextlib.nullcontext())(latents, timestep, cond)
    unmerged = family.reference(transformer, context=lambda _: trainer.copies.active("ema"))(latents, timestep, cond)
    merged = family.reference(transformer, context=lambda _: trainer._as_copy("ema", None))(latents, timestep, cond)
    assert (unmerged - policy).abs().mean() > 1e-3  # the copy differs from the policy, so the check below can fail
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, weights[n]) for n, p in transformer.named_parameters())
    assert torch.equal(family.reference(transformer, context=lambda _: contextlib.nullcontext())(latents, timestep, cond), policy)


@pytest.mark.parametrize("key", ["rollout_merge_lora", "anchor_merge_lora"])
def test_merging_is_one_key_and_resumes_exactly(tmp_path, tiny_sd3_dir, lora_difference, key):
    plain, lora_plain = _run(tmp_path / "plain", max_steps=3)
    folded, lora_folded = _run(tmp_path / "merged", max_steps=3, **{key: True})
    assert folded.merged_lora is not None and plain.merged_lora is None
    # fp32 on the CPU: merged forwards differ from unmerged ones by float rounding only, so the runs agree closely
    assert 0 < lora_difference(lora_folded, lora_plain) < 1e-3
    base = {n: p for n, p in plain.transformer.named_parameters() if "lora" not in n}
    assert all(torch.equal(p, base[n]) for n, p in folded.transformer.named_parameters() if "lora" not in n)
    _run(tmp_path / "split", max_steps=2, **{key: True})
    _, lora_resumed = _run(tmp_path / "split", max_steps=3, resume_from_checkpoint="latest", **{key: True})
    assert all(torch.equal(lora_resumed[k], lora_folded[k]) for k in lora_folded)


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True])
def test_compiled_transformer_does_not_recompile_in_steady_state(tmp_path, tiny_sd3_dir, merge):
    """compile_transformer compiles the blocks once per state (rollouts, reference, policy pass, adapters on/off);
    after one step and one held-out check of each kind, further steps and checks (another batch size) add no graph.
    The 'eager' backend runs TorchDynamo's capture and guards (what decides recompilation) without code generation."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = load_config("configs/tiny_cpu.yaml", {**SMALL, "output_dir": str(tmp_path / "run"), "compile_transformer": True,
                                                "compile_backend": "eager", "rollout_merge_lora": merge,
                                                "eval_prompts": 3, "eval_seeds": [1000], "rollout_batch_size": 8})
    trainer = Trainer(cfg)

    def step_and_checks():
        trainer.train_step()
        trainer.step += 1
        trainer.heldout_rewards(adapters=False)  # 3 images: not the rollouts' batch of 8
        trainer.heldout_rewards()

    step_and_checks()
    warm = counters["stats"]["unique_graphs"]
    assert 0 < warm <= torch._dynamo.config.recompile_limit  # compiled, and never past the limit (eager fallback)
    step_and_checks()
    step_and_checks()
    assert counters["stats"]["unique_graphs"] == warm
    torch._dynamo.reset()


@pytest.mark.parametrize("value", ["maybe", 2])
@pytest.mark.parametrize("key", ["rollout_merge_lora", "anchor_merge_lora"])
def test_merge_keys_reject_non_booleans(key, value):
    from adrpo_diffusion.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        load_config("configs/tiny_cpu.yaml", {key: value})
