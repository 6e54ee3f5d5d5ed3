import numpy as np
import pytest
import torch

from adrpo_diffusion.losses import (
    adrpo_fm_loss,
    flow_dpo_loss,
    flow_dpo_margins,
    flow_sample,
    per_sample_mse,
    sample_times,
    weighted_fm_w2_loss,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_adrpo_loss_matches_an_explicit_loop():
    v, v_ref, u = _rand(5, 4, 3, 3, seed=1), _rand(5, 4, 3, 3, seed=2), _rand(5, 4, 3, 3, seed=3)
    advantages = torch.tensor([-1.0, -0.3, 0.0, 0.4, 1.0], dtype=torch.float64)
    beta0 = 1.3
    expected = 0.0
    for i in range(5):
        a = advantages[i].item()
        mse_u = np.mean((v[i].numpy() - u[i].numpy()) ** 2)
        mse_ref = np.mean((v[i].numpy() - v_ref[i].numpy()) ** 2)
        expected += a * mse_u + (beta0 - a) * mse_ref
    expected /= 5
    assert adrpo_fm_loss(v, v_ref, u, advantages, beta0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("a", [-1.0, -0.25, 0.0, 0.6, 1.0, 1.5])
def test_loss_is_beta0_times_distance_to_v_star_plus_a_constant(a):
    """The identity of the ADRPO docstring: A||v-u||^2 + (beta0-A)||v-v_ref||^2 = beta0||v - v*||^2 + const,
    v* = v_ref + (A/beta0)(u - v_ref). Checked as: the difference does not depend on v."""
    beta0 = 0.8
    u, v_ref = _rand(1, 16, seed=4), _rand(1, 16, seed=5)
    adv = torch.tensor([a], dtype=torch.float64)
    v_star = v_ref + (a / beta0) * (u - v_ref)
    gaps = []
    for seed in range(6, 11):
        v = _rand(1, 16, seed=seed) * 3
        gaps.append(adrpo_fm_loss(v, v_ref, u, adv, beta0).item() - beta0 * per_sample_mse(v, v_star).item())
    assert np.ptp(gaps) < 1e-9
    # and the minimiser is v*: zero gradient there
    v = v_star.clone().requires_grad_(True)
    adrpo_fm_loss(v, v_ref, u, adv, beta0).backward()
    assert v.grad.abs().max().item() < 1e-12


def test_weighted_loss_parts_and_missing_reference():
    v, u = _rand(3, 8, seed=1), _rand(3, 8, seed=2)
    loss, parts = weighted_fm_w2_loss(v, None, u, torch.ones(3), torch.zeros(3))
    assert loss.item() == pytest.approx(per_sample_mse(v, u).mean().item())
    assert parts["w2_divergence"].item() == 0
    with pytest.raises(ValueError, match="v_ref is required"):
        weighted_fm_w2_loss(v, None, u, torch.ones(3), torch.ones(3))


def test_flow_dpo_loss_matches_a_per_pair_loop():
    """-log sigmoid(-0.5 beta ((e_w - e_w_ref) - (e_l - e_l_ref))), averaged over pairs, in numpy."""
    shape, beta = (4, 2, 3, 3), 7.5
    v_w, v_w_ref, u_w, v_l, v_l_ref, u_l = (_rand(*shape, seed=s) for s in range(20, 26))
    expected = []
    for i in range(shape[0]):
        e = [np.mean((a[i].numpy() - b[i].numpy()) ** 2)
             for a, b in ((v_w, u_w), (v_w_ref, u_w), (v_l, u_l), (v_l_ref, u_l))]
        margin = -0.5 * beta * ((e[0] - e[1]) - (e[2] - e[3]))
        expected.append(np.log1p(np.exp(-margin)))  # -log sigmoid(m)
    loss = flow_dpo_loss(v_w, v_w_ref, u_w, v_l, v_l_ref, u_l, beta)
    assert loss.item() == pytest.approx(np.mean(expected), rel=1e-9)
    margins = flow_dpo_margins(v_w, v_w_ref, u_w, v_l, v_l_ref, u_l, beta)
    assert np.allclose(np.log1p(np.exp(-margins.numpy())), expected)


def test_flow_dpo_loss_by_hand():
    """One pair of 1-element tensors: e_w = 1, e_w_ref = 4, e_l = 4, e_l_ref = 1 -> margin -0.5 * 2 * (-6) = 6."""
    one = torch.ones(1, 1)
    loss = flow_dpo_loss(one * 1, one * 2, one * 0, one * 2, one * 1, one * 0, 2.0)
    assert loss.item() == pytest.approx(np.log1p(np.exp(-6.0)))
    # at the reference (v = v_ref) the loss is log 2 and its gradient lowers the winner's error
    v_w = torch.tensor([[3.0]], requires_grad=True)
    loss = flow_dpo_loss(v_w, v_w.detach(), one * 0, one * 2, one * 2, one * 0, 2.0)
    loss.backward()
    assert loss.item() == pytest.approx(np.log(2)) and v_w.grad.item() > 0  # descent moves v_w towards 0


def test_flow_sample_follows_diffusers_convention():
    """The pure tensor part; each family's timestep and a check against its scheduler are in test_families.py."""
    x1, noise = _rand(3, 2, 4, 4, seed=1), _rand(3, 2, 4, 4, seed=2)
    t = torch.tensor([1.0, 0.0, 0.25], dtype=torch.float64)
    sample = flow_sample(x1, noise, t)
    x_sigma, sigma, target = sample
    assert sample.x_sigma is x_sigma and sample.sigma is sigma and sample.target is target
    assert torch.allclose(x_sigma[0], x1[0]) and torch.allclose(x_sigma[1], noise[1])  # t=1 data, t=0 noise
    assert torch.allclose(x_sigma[2], 0.25 * x1[2] + 0.75 * noise[2])  # paper: (1-t) x0 + t x1
    assert torch.allclose(sigma, torch.tensor([0.0, 1.0, 0.75], dtype=torch.float64))
    assert torch.allclose(target, noise - x1)  # -u_t


def test_time_sampling():
    g = torch.Generator().manual_seed(0)
    for scheme in ("uniform", "logit_normal"):
        t = sample_times(1000, scheme, generator=g)
        assert t.min() > 0 and t.max() < 1
    with pytest.raises(ValueError):
        sample_times(3, "beta")


def _nft_by_hand(v, v_old, x_t, x0, sigma, r, beta):
    """DiffusionNFT's per-sample loss and its gradient in v, written out in numpy (float64)."""
    losses, grads = [], []
    for i in range(len(v)):
        vi, oi, xi, di = (a[i].numpy().ravel() for a in (v, v_old, x_t, x0))
        s = sigma[i].item()
        e_pos = xi - s * (beta * vi + (1 - beta) * oi) - di
        e_neg = xi - s * ((1 + beta) * oi - beta * vi) - di
        w_pos, w_neg = max(np.abs(e_pos).mean(), 1e-5), max(np.abs(e_neg).mean(), 1e-5)
        n = e_pos.size
        losses.append((r[i].item() * np.mean(e_pos**2) / w_pos + (1 - r[i].item()) * np.mean(e_neg**2) / w_neg) / beta)
        # d/dv of e_pos^2 is -2 s beta e_pos, of e_neg^2 is +2 s beta e_neg (the weights w are constants)
        grads.append(2 * s / n * (-r[i].item() * e_pos / w_pos + (1 - r[i].item()) * e_neg / w_neg))
    return np.array(losses), np.stack(grads)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_matches_a_computation_by_hand_in_value_and_gradient(beta):
    from adrpo_diffusion.losses import nft_loss

    shape = (4, 3, 2, 2)
    x0, noise, v_old = _rand(*shape, seed=1), _rand(*shape, seed=2), _rand(*shape, seed=3)
    sigma = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=torch.float64)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    r = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64)
    v = _rand(*shape, seed=4).requires_grad_(True)
    loss = nft_loss(v, v_old, x_t, x0, sigma, r, beta)
    expected, expected_grad = _nft_by_hand(v.detach(), v_old, x_t, x0, sigma, r, beta)
    assert loss.shape == (4,) and np.allclose(loss.detach().numpy(), expected, rtol=1e-12)
    loss.sum().backward()
    assert np.allclose(v.grad.numpy().reshape(4, -1), expected_grad, rtol=1e-10, atol=1e-14)


def test_nft_loss_is_stationary_at_the_old_policy_for_r_one_half():
    """r = 1/2 (a zero advantage): v+ and v- pull equally in opposite directions around v_old."""
    from adrpo_diffusion.losses import nft_loss

    x0, noise, v_old = _rand(3, 8, seed=1), _rand(3, 8, seed=2), _rand(3, 8, seed=3)
    sigma = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t = (1 - sigma[:, None]) * x0 + sigma[:, None] * noise
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, x0, sigma, torch.full((3,), 0.5, dtype=torch.float64), 1.0).sum().backward()
    assert v.grad.abs().max() < 1e-12
    v.grad = None  # and r = 1 pulls v towards the data: x_t - sigma v closer to x0 after a small step
    nft_loss(v, v_old, x_t, x0, sigma, torch.ones(3, dtype=torch.float64), 1.0).sum().backward()
    stepped = v.detach() - 1e-3 * v.grad
    assert per_sample_mse(x_t - sigma[:, None] * stepped, x0).sum() < per_sample_mse(x_t - sigma[:, None] * v_old, x0).sum()


def test_awm_log_prob_and_clipped_ratio_match_a_computation_by_hand():
    from adrpo_diffusion.losses import awm_log_prob, clipped_ratio_loss

    v, target = _rand(5, 2, 3, 3, seed=1), _rand(5, 2, 3, 3, seed=2)
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    m = ((v - target) ** 2).numpy().reshape(5, -1).mean(axis=1)
    assert np.allclose(awm_log_prob(v, target, sigma, "uniform").numpy(), -m, rtol=1e-14)
    p = 0.25
    ghuber = -sigma.numpy() * ((m + 1e-10) ** p - 1e-10**p) / p
    assert np.allclose(awm_log_prob(v, target, sigma, "ghuber", p).numpy(), ghuber, rtol=1e-12)
    with pytest.raises(ValueError, match="ghuber or uniform"):
        awm_log_prob(v, target, sigma, "huber")

    # the clipped surrogate, on ratios inside and outside [1 - c, 1 + c], for both signs of A
    log_prob = torch.tensor([0.0, 0.5, -0.5, 0.5, -0.5, 0.05], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(6, dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -2.0], dtype=torch.float64)
    c = 0.2
    loss = clipped_ratio_loss(log_prob, old, adv, c)
    ratio = np.exp(log_prob.detach().numpy())
    expected = np.maximum(-adv.numpy() * ratio, -adv.numpy() * np.clip(ratio, 1 - c, 1 + c))
    assert np.allclose(loss.detach().numpy(), expected, rtol=1e-14)
    loss.sum().backward()
    # d ratio / d log p = ratio: the gradient is -A ratio inside the clip range, and outside it where the unclipped
    # term is the larger one; 0 where the clipped (constant) term wins
    inside = (ratio > 1 - c) & (ratio < 1 + c)
    unclipped_wins = -adv.numpy() * ratio > -adv.numpy() * np.clip(ratio, 1 - c, 1 + c)
    assert np.allclose(log_prob.grad.numpy(), np.where(inside | unclipped_wins, -adv.numpy() * ratio, 0.0), atol=1e-14)
    assert log_prob.grad[1] == 0 and log_prob.grad[4] == 0  # past the clip in the direction A pushes: no gradient


def test_stratified_times_cover_each_stratum_once():
    g = torch.Generator().manual_seed(0)
    t = sample_times(500, "uniform", draws=4, generator=g)
    assert t.shape == (4, 500)
    assert all(((t[d] >= d / 4) & (t[d] < (d + 1) / 4)).all() for d in range(4))  # draw d in its quarter
    logit = sample_times(2000, "logit_normal", draws=1, generator=g, logit_mean=0.5, logit_std=1.2)
    logits = torch.logit(logit)
    assert abs(logits.mean() - 0.5) < 0.08 and abs(logits.std() - 1.2) < 0.08  # the inverse CDF keeps the law
    sampler_t = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9])
    s = sample_times(300, "sampler", draws=5, generator=g, sampler_t=sampler_t)
    assert all(torch.equal(s[d], torch.full((300,), sampler_t[d].item())) for d in range(5))  # one time per stratum
    one = sample_times(3000, "sampler", generator=g, sampler_t=sampler_t)
    counts = torch.stack([(one == v).sum() for v in sampler_t])
    assert counts.sum() == 3000 and counts.min() > 500  # each sampler time about 600 times
    with pytest.raises(ValueError, match="sampler_t"):
        sample_times(3, "sampler")
