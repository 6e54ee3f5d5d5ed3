import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from adrpo_diffusion.advantages import decoupled_signal, group_advantages, group_means, normalized_advantages
from adrpo_diffusion.methods import build_method


def test_normalized_advantages_against_numpy_and_scale_invariance():
    """(R - group mean) / max(std, eps), std the population std over the group or the whole batch (numpy's default,
    as Flow-GRPO and DiffusionNFT compute it)."""
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=9) * 2 + 5
    rewards[6:] = 3.0  # a group whose rewards are all equal
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    centred = np.array([rewards[i] - rewards[groups == groups[i]].mean() for i in range(9)])
    group_std = np.array([rewards[groups == groups[i]].std() for i in range(9)])
    r, g = torch.tensor(rewards), torch.tensor(groups)
    a, divisor = normalized_advantages(r, g, "group_std", eps=1e-4)
    assert np.allclose(a.numpy(), centred / np.maximum(group_std, 1e-4)) and np.all(a.numpy()[6:] == 0)
    assert np.allclose(divisor.numpy(), np.maximum(group_std, 1e-4))
    b, _ = normalized_advantages(r, g, "batch_std")
    assert np.allclose(b.numpy(), centred / rewards.std())
    none, ones = normalized_advantages(r, g, "none")
    assert np.allclose(none.numpy(), centred) and torch.equal(ones, torch.ones(9, dtype=torch.float64))
    for mode in ("group_std", "batch_std"):  # a reward times 5 (or plus a constant) gives the same advantages
        assert torch.allclose(normalized_advantages(5 * r + 2, g, mode)[0], normalized_advantages(r, g, mode)[0])
    with pytest.raises(ValueError, match="none, group_std, batch_std"):
        normalized_advantages(r, g, "rank")


def _z(values, groups, eps=1e-4):
    """Group standardisation, one group at a time (population std; 0 where it is <= eps)."""
    out = np.zeros(len(values))
    for g in np.unique(groups):
        member = groups == g
        std = values[member].std()
        out[member] = (values[member] - values[member].mean()) / std if std > eps else 0.0
    return out


def test_decoupled_signal_against_numpy():
    """s = (1 - m) z(R) + m z(sum_k w_k z(c_k)), z per group; a part's NaN (a check that does not apply) counts 0, a
    part that does not vary in a group adds nothing there, a NaN reward makes its group NaN; the parts' scales do not
    matter, only their weights."""
    rng = np.random.default_rng(3)
    groups = np.repeat([0, 1, 2], 4)
    colour, shape = rng.uniform(size=12), rng.uniform(size=12)
    colour[4:8] = 0.9  # group 1: colour does not vary
    position = np.where(groups == 2, rng.uniform(size=12), np.nan)  # applies to group 2's prompt only
    rewards = np.nanmean(np.stack([colour, shape, position]), axis=0)
    parts = [(1.0, colour), (2.0, shape), (1.0, position)]
    decoupled = _z(sum(w * _z(np.nan_to_num(c), groups) for w, c in parts), groups)
    g, r = torch.tensor(groups), torch.tensor(rewards)
    tensors = [(w, torch.tensor(c)) for w, c in parts]
    for mix in (0.0, 0.5, 1.0):
        expected = (1 - mix) * _z(rewards, groups) + mix * decoupled
        assert np.allclose(decoupled_signal(r, tensors, g, mix).numpy(), expected, atol=1e-12)
    assert not np.allclose(decoupled, _z(rewards, groups))  # the test can tell the two apart
    rescaled = [(w, 10 * c + 3) for w, c in tensors]  # a part's scale and offset are normalised away
    assert torch.allclose(decoupled_signal(r, rescaled, g, 1.0), decoupled_signal(r, tensors, g, 1.0))
    r_nan = r.clone()
    r_nan[5] = float("nan")
    signal = decoupled_signal(r_nan, tensors, g, 0.5)
    assert signal[4:8].isnan().all() and torch.allclose(signal[8:], decoupled_signal(r, tensors, g, 0.5)[8:])
    with pytest.raises(ValueError, match=r"mix must be in \[0, 1\]"):
        decoupled_signal(r, tensors, g, 1.5)


def test_group_advantages_against_numpy():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=12) * 3
    groups = np.array([3, 3, 3, 7, 7, 7, 1, 1, 1, 1, 0, 0])  # arbitrary ids, unequal sizes, any order
    expected = np.array([rewards[i] - rewards[groups == groups[i]].mean() for i in range(12)])
    raw = group_advantages(torch.tensor(rewards), torch.tensor(groups), clip_range=None)
    assert np.allclose(raw.numpy(), expected)
    clipped = group_advantages(torch.tensor(rewards), torch.tensor(groups), clip_range=(-0.5, 1.0))
    assert np.allclose(clipped.numpy(), np.clip(expected, -0.5, 1.0))
    assert np.allclose(group_means(torch.tensor(rewards), torch.tensor(groups)).numpy(), rewards - expected)


def test_group_advantages_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal length"):
        group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, global_rewards, groups, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from accelerate import PartialState
    from accelerate.utils import gather

    state = PartialState(cpu=True, backend="gloo")
    n = global_rewards.numel() // world
    local_rewards = global_rewards[rank * n : (rank + 1) * n].clone()
    # what the trainer does: gather every process's rewards, weight the whole batch, keep this slice
    plan = build_method("adrpo", {}, images_per_prompt=4).plan(gather(local_rewards), groups, state.process_index, n)
    # plain floats: a tensor would be shared through a file descriptor that dies with this process
    queue.put((rank, plan.values["fm"].tolist()))
    state.wait_for_everyone()
    state.destroy_process_group()


def test_groups_split_across_processes_see_their_whole_group():
    """Two real processes (gloo): K=4 images per prompt, 6 per process, so group 1 spans both processes.
    Each process's advantages must equal the single-process computation on the full batch."""
    world = 2
    rewards = torch.tensor([0.0, 1, 2, 3, 10, 11, 14, 17, -5, -4, -3, 4])
    groups = torch.arange(12) // 4
    expected = group_advantages(rewards, groups, clip_range=(-1.0, 1.0))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, rewards, groups, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    got = torch.tensor([value for r in range(world) for value in results[r]])
    assert torch.allclose(got, expected)
    # a per-process baseline would have been wrong for the split group:
    per_process = torch.cat([group_advantages(rewards[:6], groups[:6], (-1.0, 1.0)),
                             group_advantages(rewards[6:], groups[6:], (-1.0, 1.0))])
    assert not torch.allclose(per_process, expected)
