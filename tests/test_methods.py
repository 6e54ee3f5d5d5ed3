"""The method registry: each method's weights, pairs and checks, on hand-computed numbers (no model)."""

import numpy as np
import pytest
import torch

from adrpo_diffusion.advantages import preference_pairs
from adrpo_diffusion.config import ConfigError, build_arg_parser, load_config
from adrpo_diffusion.losses import awm_log_prob, nft_loss, per_sample_mse, weighted_fm_w2_loss
from adrpo_diffusion.methods import FlowBatch, available_methods, build_method, ramp

REWARDS = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.5, 14.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])


def plan(name, options=None, rewards=REWARDS, groups=GROUPS, rank=0, n_local=None):
    method = build_method(name, options or {}, images_per_prompt=int(torch.bincount(groups).max()))
    return method.plan(rewards, groups, rank, rewards.numel() if n_local is None else n_local)


def flow_batch(v_theta, target, **anchors):
    """A micro-batch whose clean latents, noise level and input are irrelevant to the loss under test."""
    zeros = torch.zeros_like(target)
    return FlowBatch(zeros, zeros, torch.zeros(len(target)), target, v_theta, anchors)


def test_advantage_weighted_methods_and_raft():
    # group means 2 and 11.5 -> raw A = [-1, 0, 1, -1.5, -1, 2.5]
    adrpo = plan("adrpo")
    assert torch.allclose(adrpo.values["fm"], torch.tensor([-1.0, 0, 1, -1, -1, 1]))
    assert torch.allclose(adrpo.values["w2"], 1.0 - adrpo.values["fm"])
    assert adrpo.needs_reference and adrpo.unit == 1 and adrpo.global_units == 6
    assert adrpo.metrics["clip_fraction"] == pytest.approx(2 / 6)
    assert adrpo.metrics["advantage_raw_abs_mean"] == pytest.approx(7 / 6)

    fixed = plan("fixed-beta", {"beta": 0.3})
    assert torch.allclose(fixed.values["fm"], adrpo.values["fm"]) and torch.allclose(fixed.values["w2"], torch.full((6,), 0.3))
    assert not plan("fixed-beta", {"beta": 0}).needs_reference

    raft = plan("raft")
    assert torch.allclose(raft.values["fm"], torch.tensor([0.0, 0, 3, 0, 0, 3]))  # K/k = 3 on the best of each group
    assert not raft.needs_reference and raft.values["w2"].abs().sum() == 0


def test_normalized_advantages_in_the_weighted_methods():
    # group std of [1, 2, 3] and [10, 10.5, 14]: sqrt(2/3) and sqrt(((-1.5)^2 + 1 + 2.5^2) / 3)
    stds = torch.tensor([np.sqrt(2 / 3)] * 3 + [np.sqrt((1.5**2 + 1 + 2.5**2) / 3)] * 3, dtype=torch.float32)
    raw = torch.tensor([-1.0, 0, 1, -1.5, -1, 2.5])
    adrpo = plan("adrpo", {"advantage_normalization": "group_std", "advantage_min": -5, "advantage_max": 5,
                           "beta0": 5})
    assert torch.allclose(adrpo.values["fm"], raw / stds) and torch.allclose(adrpo.values["w2"], 5 - raw / stds)
    assert adrpo.metrics["advantage_divisor_mean"] == pytest.approx(stds.mean().item())
    orw = plan("orw-cfm-w2", {"advantage_normalization": "batch_std"})
    tilt = torch.exp(0.5 * raw / REWARDS.std(correction=0))
    assert torch.allclose(orw.values["fm"], tilt / torch.cat([tilt[:3].mean().expand(3), tilt[3:].mean().expand(3)]))


def test_nft_plan_and_loss_follow_the_official_code():
    """Batch std, clip +-5, r = A / 10 + 1/2; loss = 5 * nft_loss(...).mean() + kl_beta * mse(v, v_ref)."""
    nft = plan("nft")
    a = torch.tensor([-1.0, 0, 1, -1.5, -1, 2.5]) / REWARDS.std(correction=0)
    assert torch.allclose(nft.values["r"], (a.clamp(-5, 5) / 10 + 0.5)) and nft.anchors == ("old", "reference")
    assert plan("nft", {"kl_beta": 0}).anchors == ("old",)
    method = build_method("nft", {"beta": 0.1, "kl_beta": 0.01}, images_per_prompt=3)
    g = torch.Generator().manual_seed(0)
    x0, x_t, v, v_old, v_ref = (torch.randn(6, 2, 2, 2, generator=g) for _ in range(5))
    sigma = torch.rand(6, generator=g)
    batch = FlowBatch(x0, x_t, sigma, torch.zeros_like(x0), v, {"old": v_old, "reference": v_ref})
    loss, parts = method.loss(batch, nft.values)
    expected = 5 * nft_loss(v, v_old, x_t, x0, sigma, nft.values["r"], 0.1).mean() + 0.01 * per_sample_mse(v, v_ref).mean()
    assert torch.allclose(loss, expected) and parts["w2_divergence"] == per_sample_mse(v, v_ref).mean()
    assert method.rollout_adapter == "old" and method.copies() == ("old",)
    # the old copy's decay: the code's decay_type 1 (default) and 2
    assert [method.copy_decay("old", s) for s in (0, 1, 100, 1000)] == [0.0, 0.001, 0.1, 0.5]
    assert [ramp(s, 0.0075, 0.999, 75) for s in (74, 75, 76, 1000)] == [0.0, 0.0, 0.0075, 0.999]


def test_awm_plan_and_loss_follow_the_official_code():
    """A = clip(normalised, +-5) / 5; loss = mean(-A ratio) (ratio 1 in value) + kl_beta mse(v, v_ref) + ema_beta
    mse(v, v_ema); the gradient of the policy term is that of -A log p."""
    awm = plan("awm")
    a = torch.tensor([-1.0, 0, 1, -1.5, -1, 2.5]) / REWARDS.std(correction=0)
    assert torch.allclose(awm.values["advantage"], a.clamp(-5, 5) / 5) and awm.anchors == ("ema", "reference")
    assert plan("awm", {"ema_beta": 0, "kl_beta": 0}).anchors == ()
    method = build_method("awm", {}, images_per_prompt=3)
    g = torch.Generator().manual_seed(0)
    target, v_ref, v_ema = (torch.randn(6, 2, 2, 2, generator=g) for _ in range(3))
    v = torch.randn(6, 2, 2, 2, generator=g, requires_grad=True)
    sigma = torch.rand(6, generator=g)
    loss, parts = method.loss(FlowBatch(target, target, sigma, target, v, {"reference": v_ref, "ema": v_ema}),
                              awm.values)
    anchors = 0.003 * per_sample_mse(v, v_ref).mean() + 1.0 * per_sample_mse(v, v_ema).mean()
    assert torch.allclose(loss, -awm.values["advantage"].mean() + anchors)
    loss.backward()
    grad = v.grad.clone()
    v.grad = None
    (-(awm.values["advantage"] * awm_log_prob(v, target, sigma)).mean() + anchors).backward()
    assert torch.allclose(grad, v.grad) and parts["awm_clip_fraction"] == 0
    assert [method.copy_decay("ema", s) for s in (1, 100, 1000)] == [0.001, 0.1, 0.3]


def test_adrpo_moving_anchor_pulls_to_the_ema_copy_and_logs_the_divergence_to_the_base():
    base = plan("adrpo")
    ema = plan("adrpo", {"anchor": "ema", "anchor_decay": 0.9})
    assert base.anchors == ("reference",) and ema.anchors == ("ema", "reference")
    assert plan("adrpo", {"anchor": "ema", "base_divergence": False}).anchors == ("ema",)  # the base not run
    assert plan("adrpo", {"base_divergence": False}).anchors == ("reference",)  # the anchor itself: still run
    assert torch.equal(base.values["fm"], ema.values["fm"]) and torch.equal(base.values["w2"], ema.values["w2"])
    method = build_method("adrpo", {"anchor": "ema", "anchor_decay": 0.9}, images_per_prompt=3)
    assert method.copies() == ("ema",) and method.copy_decay("ema", 7) == 0.9
    assert build_method("adrpo", {}, images_per_prompt=3).copies() == ()
    g = torch.Generator().manual_seed(0)
    target, v, v_ref, v_ema = (torch.randn(6, 4, generator=g) for _ in range(4))
    loss, parts = method.loss(flow_batch(v, target, reference=v_ref, ema=v_ema), ema.values)
    expected, _ = weighted_fm_w2_loss(v, v_ema, target, ema.values["fm"], ema.values["w2"])
    assert torch.equal(loss, expected)
    assert parts["anchor_divergence"] == per_sample_mse(v, v_ema).mean()
    assert parts["w2_divergence"] == per_sample_mse(v, v_ref).mean()


def test_orw_weights_follow_the_source_per_prompt():
    """w = exp(tau R) (the official code), divided by its mean over each prompt's samples; ESS = (sum w)^2 / sum w^2."""
    tau = 0.5
    w = np.exp(tau * REWARDS.numpy().astype(np.float64))
    expected = np.concatenate([w[:3] / w[:3].mean(), w[3:] / w[3:].mean()])
    orw = plan("orw-cfm-w2", {"tau": tau, "beta": 0.2})
    assert np.allclose(orw.values["fm"].numpy(), expected, rtol=1e-6)
    assert torch.allclose(orw.values["w2"], torch.full((6,), 0.2)) and orw.needs_reference
    assert orw.metrics["orw_ess"] == pytest.approx(expected.sum() ** 2 / (expected**2).sum(), rel=1e-6)
    # a constant added to one prompt's rewards changes nothing; the whole-batch weights would move to that prompt
    shifted = plan("orw-cfm-w2", {"tau": tau}, rewards=REWARDS + torch.tensor([0, 0, 0, 30.0, 30, 30]))
    assert torch.allclose(shifted.values["fm"], orw.values["fm"], rtol=1e-5)

    raw = plan("orw-cfm-w2", {"tau": tau, "normalize": "none"})  # the official code verbatim
    assert np.allclose(raw.values["fm"].numpy(), w, rtol=1e-6)
    assert raw.metrics["orw_ess"] == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-6)
    uniform = plan("orw-cfm-w2", {"tau": 0})
    assert torch.equal(uniform.values["fm"], torch.ones(6)) and uniform.metrics["orw_ess"] == pytest.approx(6)


def test_preference_pairs():
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.9, 3.0, 3.0, 3.0, 3.0, 1.0, 1.05, 2.0, 0.0])
    groups = torch.arange(12) // 4
    winners, losers, skipped = preference_pairs(rewards, groups)
    # best vs worst (first index on ties); group 1 is all equal: no pair, counted
    assert winners.tolist() == [1, 10] and losers.tolist() == [0, 11] and skipped == 1

    winners, losers, skipped = preference_pairs(rewards, groups, all_pairs=True, min_gap=0.25)
    expected = {(1, 0), (3, 0), (2, 0), (1, 2), (3, 2), (8, 11), (9, 11), (10, 11), (10, 8), (10, 9)}
    assert set(zip(winners.tolist(), losers.tolist())) == expected and skipped == 1  # 0.9 vs 0.9, 1.05 vs 1.0: no

    _, _, skipped = preference_pairs(rewards, groups, min_gap=2.5)  # gaps 0.7, 0, 2.0: none is > 2.5
    assert skipped == 3
    winners, _, skipped = preference_pairs(torch.full((8,), float("nan")), torch.arange(8) // 4)
    assert winners.numel() == 0 and skipped == 2


def test_dpo_plan_keeps_each_process_on_its_own_groups():
    rewards = torch.tensor([0.1, 0.4, 0.3, 0.2, 5.0, 5.0, 5.0, 5.0, 2.0, 1.0, 3.0, 0.0])
    groups = torch.arange(12) // 4
    plans = [plan("dpo", {}, rewards, groups, rank=r, n_local=4) for r in range(3)]
    assert [p.rows.tolist() for p in plans] == [[1, 0], [], [2, 3]]  # winner then loser, local indices
    assert all(p.global_units == 2 and p.unit == 2 and p.needs_reference for p in plans)
    assert plans[0].metrics["dpo_pairs"] == 2 and plans[0].metrics["dpo_groups_skipped"] == 1
    assert plans[0].metrics["dpo_reward_gap_mean"] == pytest.approx((0.3 + 3.0) / 2)
    all_pairs = plan("dpo", {"pairs": "all", "min_gap": 0.15}, rewards, groups, rank=0, n_local=4)
    assert all_pairs.rows.view(-1, 2).tolist() == [[1, 0], [1, 3], [2, 0]] and all_pairs.global_units == 3 + 6


def test_dpo_loss_on_interleaved_rows_is_flow_dpo_loss():
    from adrpo_diffusion.losses import flow_dpo_loss

    g = torch.Generator().manual_seed(0)
    v, v_ref, target = (torch.randn(6, 2, 2, 2, generator=g) for _ in range(3))
    method = build_method("dpo", {"beta": 3.0}, images_per_prompt=2)
    loss, parts = method.loss(flow_batch(v, target, reference=v_ref), {})
    expected = flow_dpo_loss(v[0::2], v_ref[0::2], target[0::2], v[1::2], v_ref[1::2], target[1::2], 3.0)
    assert torch.equal(loss, expected) and set(parts) >= {"loss", "dpo_accuracy", "dpo_margin", "w2_divergence"}
    _, at_reference = method.loss(flow_batch(v_ref, target, reference=v_ref), {})
    assert at_reference["dpo_margin"] == 0 and at_reference["dpo_accuracy"] == 0  # no pair is won yet


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("ppo", {}, "method must be one of adrpo, fixed-beta, orw-cfm-w2, raft, dpo, nft, awm, got 'ppo'"),
        ("adrpo", {"advantage_normalization": "rank"}, "advantage_normalization must be one of none, group_std, "
                                                       "batch_std, got 'rank'"),
        ("nft", {"advantage_epsilon": 0}, "advantage_epsilon must be > 0"),
        ("adrpo", {"anchor": "old"}, "anchor must be base or ema"),
        ("adrpo", {"anchor_decay": 1}, "anchor_decay must be in [0, 1)"),
        ("nft", {"beta": 0}, "beta must be > 0"),
        ("nft", {"old_decay_max": 1.0}, "old_decay_max must be in [0, 1)"),
        ("awm", {"weighting": "huber"}, "weighting must be ghuber or uniform"),
        ("awm", {"clip_range": 0}, "clip_range must be > 0"),
        ("orw-cfm-w2", {"normalize": "none", "advantage_normalization": "group_std"}, "needs normalize: group"),
        ("dpo", {"dpo_beta": 10.0}, "Unknown config key(s) in method_options of dpo: 'dpo_beta' (did you mean "
                                    "'beta'?). Valid keys: beta, pairs, min_gap"),
        ("adrpo", {"beta_0": 1.0}, "(did you mean 'beta0'?)"),
        ("raft", {"top_k": 1.5}, "method_options.top_k must be int, got 1.5 (float)"),
        ("dpo", {"beta": 0}, "beta must be > 0, got 0.0"),
        ("dpo", {"pairs": "best"}, "pairs must be best-worst or all"),
        ("dpo", {"min_gap": -1}, "min_gap must be >= 0"),
        ("adrpo", {"beta0": 0}, "beta0 must be > 0"),
        ("adrpo", {"advantage_min": 1, "advantage_max": 1}, "advantage_min (1.0) must be < advantage_max (1.0)"),
        ("fixed-beta", {"beta": -1}, "beta must be >= 0"),
        ("orw-cfm-w2", {"tau": -1}, "tau must be >= 0"),
        ("orw-cfm-w2", {"normalize": "batch"}, "normalize must be group or none"),
        ("raft", {"top_k": 8}, "top_k must be in [1, images_per_prompt - 1 = 7], got 8"),
    ],
)
def test_method_and_options_are_checked_at_config_load(method, options, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny_cpu.yaml", {"method": method, "method_options": options})
    assert message in str(info.value)


def test_ints_are_accepted_for_float_options_and_help_lists_every_parameter():
    cfg = load_config("configs/tiny_cpu.yaml", {"method": "dpo", "method_options": {"beta": 100, "pairs": "all"}})
    assert build_method(cfg.method, cfg.method_options, 8).beta == 100.0
    help_text = build_arg_parser().format_help()
    for name, fields in {"adrpo": ("beta0", "advantage_min", "advantage_max"), "orw-cfm-w2": ("tau", "normalize"),
                         "raft": ("top_k",), "dpo": ("beta", "pairs", "min_gap"), "fixed-beta": ("beta",),
                         "nft": ("beta", "kl_beta", "old_decay_rate"), "awm": ("clip_range", "ghuber_power", "ema_beta")
                         }.items():
        assert name in available_methods()
        section = help_text[help_text.index(f"  {name}: "):]
        assert all(f"    {field} (" in section for field in fields)
