import numpy as np
import pytest
import torch

from adrpo_diffusion.losses import (
    adrpo_fm_loss,
    flow_dpo_loss,
    flow_dpo_margins,
    flow_matching_pair,
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
    """DESIGN.md section 2: A||v-u||^2 + (beta0-A)||v-v_ref||^2 = beta0||v - v*||^2 + const,
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


def test_flow_matching_pair_follows_diffusers_convention():
    """The pure tensor part; each family's timestep and a check against its scheduler are in test_families.py."""
    x1, noise = _rand(3, 2, 4, 4, seed=1), _rand(3, 2, 4, 4, seed=2)
    t = torch.tensor([1.0, 0.0, 0.25], dtype=torch.float64)
    x_sigma, sigma, target = flow_matching_pair(x1, noise, t)
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
