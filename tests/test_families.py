"""Every model family through one interface, on its tiny offline pipeline: the time/sign convention against the
family's own scheduler, the whole training loop (rollout -> reward -> loss -> step), exact resume, and a LoRA that the
family's diffusers pipeline loads on a fresh pipeline and that reproduces the trained transformer."""

import json

import pytest
import torch
from safetensors.torch import load_file

from adrpo_diffusion.config import load_config
from adrpo_diffusion.families import FAMILIES, load_family
from adrpo_diffusion.losses import flow_sample, per_sample_mse
from adrpo_diffusion.trainer import Trainer

BUILTIN = {"sd3": "builtin:tiny-sd3", "flux": "builtin:tiny-flux", "sana": "builtin:tiny-sana"}
CONFIG = {"sd3": "configs/tiny_cpu.yaml", "flux": "configs/tiny_flux_cpu.yaml", "sana": "configs/tiny_sana_cpu.yaml"}


def test_every_family_has_a_tiny_model_and_a_config():
    assert set(BUILTIN) == set(FAMILIES)
    for name in FAMILIES:
        assert load_config(CONFIG[name]).pretrained_model == BUILTIN[name]


def _one_step_to_data(scheduler, velocity, sigma: float, x_sigma):
    """The scheduler's own update from noise level ``sigma`` straight to 0 (the clean sample)."""
    scheduler.timesteps = torch.tensor([1000.0 * sigma])
    scheduler.sigmas = torch.tensor([sigma, 0.0])
    scheduler.num_inference_steps = 1
    scheduler._step_index = None
    if hasattr(scheduler, "model_outputs"):  # DPM-Solver (SANA): a fresh multistep history
        scheduler.model_outputs = [None] * scheduler.config.solver_order
        scheduler.lower_order_nums = 0
    return scheduler.step(velocity, scheduler.timesteps[0], x_sigma, return_dict=False)[0]


def _scheduler_error_after_fm_training(family, sign: float, steps: int = 60) -> tuple[float, float]:
    """Train LoRA on mse(velocity, sign * target) at one (x1, noise, t) through the family's flow-matching pair and
    velocity call; return the error against x1 of the family scheduler's step from x_sigma to sigma = 0, before and
    after. The LoRA's random init comes from a fixed seed, not from whatever the tests before left in the global RNG
    (after/before ranges 0.66-0.74 over init seeds for the tiny SD3, hence the 0.8 bound of the caller)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        family.add_lora(8, 8, [*family.lora_targets, "proj_out"])
    transformer, scheduler = family.transformer, family.pipe.scheduler
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=2e-2)
    g = torch.Generator().manual_seed(0)
    x1, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    cond = family.encode_prompts(["a red square", "a blue circle"], "cpu", torch.float32, 8).select([0, 1], "cpu",
                                                                                                    torch.float32)
    t = torch.tensor([0.4, 0.4])
    x_sigma, sigma, target = flow_sample(x1, noise, t)
    timestep = family.timestep(sigma)

    def error():
        with torch.no_grad():
            v = family.velocity(transformer, x_sigma, timestep, cond)
            return per_sample_mse(_one_step_to_data(scheduler, v, 1.0 - t[0].item(), x_sigma), x1).mean().item()

    before = error()
    for _ in range(steps):
        loss = per_sample_mse(family.velocity(transformer, x_sigma, timestep, cond), sign * target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, error()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_time_and_sign_convention_against_the_familys_scheduler(name):
    """Minimising the FM term with the family's target moves its real tiny transformer's velocity towards the sample
    (the family's own scheduler step lands closer to x1); the sign flipped does the opposite. This is the check that
    catches a wrong time/sign mapping or a wrong packing."""
    before, after = _scheduler_error_after_fm_training(load_family(BUILTIN[name]), sign=1.0)
    assert after < 0.8 * before
    before_wrong, after_wrong = _scheduler_error_after_fm_training(load_family(BUILTIN[name]), sign=-1.0)
    assert after_wrong > before_wrong


@pytest.mark.parametrize("name", list(FAMILIES))
def test_velocity_call_matches_the_pipelines_own_denoising_step(name):
    """One rollout step of the family's pipeline (its own transformer call: timestep scale, packing, ids, masks,
    guidance embedding) equals ``x - sigma * v`` with the family's velocity at the family's timestep for that sigma:
    the regression trains the very velocity the rollouts integrate."""
    family = load_family(BUILTIN[name], guidance_scale=3.5 if name == "flux" else 1.0)  # no CFG: conditional only
    family.pipe.set_progress_bar_config(disable=True)
    cache = family.encode_prompts(["a red square", "a blue circle"], "cpu", torch.float32, 8)
    x1 = family.sample(cache, [0, 1], num_inference_steps=1, resolution=32, batch_size=2,
                       generators=[torch.Generator().manual_seed(s) for s in (3, 4)])
    noise = torch.stack([torch.randn(x1.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    scheduler = family.pipe.scheduler
    sigma = scheduler.sigmas[0].item()
    # the noise level the transformer was told: 1000 sigma, rounded to an integer by SANA's DPM-Solver
    told = torch.full((2,), scheduler.timesteps[0].item() / 1000)
    with torch.no_grad():
        v = family.velocity(family.transformer, noise, family.timestep(told), cache.select([0, 1], "cpu", torch.float32))
    assert 0 < sigma <= 1 and torch.allclose(x1, noise - sigma * v, atol=1e-4)


SMALL = dict(prompts_per_step=2, images_per_prompt=4, timesteps_per_sample=1, eval_prompts=0, sample_every=0,
             checkpointing_steps=1, lora_rank=4, lora_alpha=8.0, rollout_batch_size=8, train_batch_size=8)


def _metrics(directory):
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampler_sigmas_are_the_noise_levels_of_the_familys_own_schedule(name):
    """``time_sampling: sampler`` trains where the rollouts evaluate the model: the recorded levels are the schedule
    that the pipeline's own scheduler holds after the rollout (shift and all), from pure noise down."""
    family = load_family(BUILTIN[name])
    family.pipe.set_progress_bar_config(disable=True)
    cache = family.encode_prompts(["a red circle"], "cpu", torch.float32, 8)
    sigmas = family.sampler_sigmas(cache, num_inference_steps=6, resolution=32)
    scheduled = family.pipe.scheduler.sigmas[:6].float()
    # SANA's DPM-Solver hands the transformer integer timesteps (999 for sigma 0.9997): what the model sees is kept
    assert sigmas.shape == (6,) and torch.allclose(sigmas, scheduled, atol=1e-3 if name == "sana" else 1e-5)
    assert sigmas[0] == pytest.approx(1.0, abs=1e-3) and torch.all(sigmas[1:] < sigmas[:-1]) and sigmas[-1] > 0


def test_adapter_copies_follow_the_policy_and_stay_out_of_the_export(tmp_path):
    """The old/EMA copies of the policy are extra adapters: equal to the policy at the start, updated as
    d copy + (1 - d) policy, frozen, in the checkpoint state, and never in the exported LoRA."""
    from adrpo_diffusion.families import AdapterCopies

    family = load_family(BUILTIN["sd3"])
    transformer = family.transformer
    config = family.add_lora(4, 8.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in transformer.named_parameters():
            if "lora_B" in key:
                param.normal_(0, 0.1, generator=g)
    policy = {k: p for k, p in transformer.named_parameters() if p.requires_grad}
    copies = AdapterCopies(transformer, config, ["old", "ema"])
    assert {k for k, p in transformer.named_parameters() if p.requires_grad} == set(policy)  # only the policy trains
    x, timestep = torch.randn(2, 4, 16, 16, generator=g), family.timestep(torch.tensor([0.3, 0.8]))
    cond = family.encode_prompts(["a", "b"], "cpu", torch.float32, 8).select([0, 1], "cpu", torch.float32)
    with torch.no_grad():
        before = family.velocity(transformer, x, timestep, cond)
        with copies.active("old"):
            assert torch.equal(family.velocity(transformer, x, timestep, cond), before)
        assert {k for k, p in transformer.named_parameters() if p.requires_grad} == set(policy)
        first = {k: p.clone() for k, p in policy.items()}
        for param in policy.values():
            param.add_(torch.randn(param.shape, generator=g) * 0.1)  # the policy moves on
        copies.update("old", 0.25)
    params = dict(transformer.named_parameters())
    for key in policy:
        expected = 0.25 * first[key] + 0.75 * policy[key]
        assert torch.allclose(params[key.replace(".default.", ".old.")], expected, atol=1e-7)
        assert torch.equal(params[key.replace(".default.", ".ema.")], first[key])  # untouched
    with torch.no_grad(), copies.active("ema"):
        assert torch.allclose(family.velocity(transformer, x, timestep, cond), before, atol=1e-6)

    state = copies.state_dict()
    copies.reset()
    assert not all(torch.equal(state[k], v) for k, v in copies.state_dict().items())
    copies.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in copies.state_dict().items())
    with pytest.raises(ValueError, match="do not match"):
        copies.load_state_dict({k: v for k, v in state.items() if k.startswith("old/")})

    exported = load_file(str(family.export_lora(transformer, config, tmp_path)))
    assert len(exported) == len(policy) and not any(".old." in k or ".ema." in k for k in exported)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_the_trainer_frees_the_text_encoders_at_once(tmp_path, name):
    """Once the prompts are cached the text encoders (T5-XXL alone is 9 GB in bf16) are gone: freed by reference
    counting as the Trainer drops them, with no garbage collection (a full collection costs about 0.3 s a Trainer)."""
    import gc
    import weakref

    family = load_family(BUILTIN[name])
    encoders = [weakref.ref(getattr(family.pipe, n)) for n in family.text_encoders
                if getattr(family.pipe, n, None) is not None]
    assert encoders
    gc.disable()
    try:
        Trainer(load_config(CONFIG[name], {**SMALL, "output_dir": str(tmp_path / "run")}), family=family)
        assert all(ref() is None for ref in encoders)
    finally:
        gc.enable()


@pytest.mark.parametrize("name, method", [("flux", "adrpo"), ("sana", "adrpo"), ("flux", "nft"), ("sana", "awm")])
def test_family_trains_resumes_exactly_and_exports_a_lora_its_pipeline_loads(tmp_path, name, method):
    """rollout -> reward -> loss -> step on the family's tiny pipeline; 2 steps == 1 + resume + 1 to the bit; the LoRA
    (alpha != r) loads with the family's own ``load_lora_weights`` on a fresh pipeline and reproduces the trained
    transformer's velocity."""

    def config(run, **extra):
        return load_config(CONFIG[name], {**SMALL, "method": method, "output_dir": str(tmp_path / run), **extra})

    full = Trainer(config("full", max_steps=2))
    full.train()
    Trainer(config("split", max_steps=1)).train()
    resumed = Trainer(config("split", max_steps=2, resume_from_checkpoint="latest"))
    assert resumed.step == 1
    resumed.train()

    a, b = (load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors")) for run in ("full", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("transformer.") for k in a) and any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    rows = _metrics(tmp_path / "full")
    assert rows == _metrics(tmp_path / "split")
    assert all(row["skipped_nonfinite"] == 0 and row["grad_norm"] > 0 for row in rows)

    family = full.family
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    timestep = family.timestep(torch.tensor([0.3, 0.8]))
    cond = full.cache.select([0, 1], "cpu", torch.float32)
    with torch.no_grad():
        trained = family.velocity(full.transformer, x, timestep, cond)
        fresh = load_family(BUILTIN[name], guidance_scale=family.guidance_scale)
        assert type(fresh.pipe).__name__ == family.pipeline_class
        base = fresh.velocity(fresh.transformer, x, timestep, cond)
        fresh.pipe.load_lora_weights(str(tmp_path / "full"))
        loaded = fresh.velocity(fresh.transformer, x, timestep, cond)
    assert not torch.allclose(base, trained, atol=1e-5)  # the adapter does something
    assert torch.allclose(loaded, trained, atol=1e-5)  # and loads at the trained strength (alpha / r = 2)
