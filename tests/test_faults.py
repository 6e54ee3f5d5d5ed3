"""What real clusters do to runs, caused for real: stop signals sent to a real training process, a process of a
two-process run killed, a disk that fills at the write, rewards that raise or return NaN. Nothing finished is lost:
the resumed run's LoRA equals the uninterrupted run's bit for bit."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adrpo_diffusion.checkpoint import list_checkpoints, resolve_resume
from adrpo_diffusion.config import load_config
from adrpo_diffusion.faults import RewardFailed, WriteFailed
from adrpo_diffusion.methods import build_method, plan_on_finite_groups
from adrpo_diffusion.trainer import Trainer
from adrpo_diffusion.utils import build_once

REPO = Path(__file__).resolve().parents[1]
SMALL = {"prompts_per_step": 2, "images_per_prompt": 4, "timesteps_per_sample": 1, "eval_prompts": 0,
         "sample_every": 0, "method_options": {}}
STEPS = 30  # long enough for a signal to land mid-run
# The runs in real processes: 3 groups of 2, so with two processes (3 rollouts each) the middle group spans both
# and its baseline needs the gathered rewards (tests/test_training.py runs DPO and NFT on two processes). ADRPO with
# the config's moving anchor: a copy of the policy that the checkpoint must carry for the resumed run to be the same.
LAUNCHED = {**SMALL, "prompts_per_step": 3, "images_per_prompt": 2, "method_options": {"anchor": "ema"}}


# ------------------------------------------------------------------------------------------- runs in real processes
def _launch(out, *args, processes=1):
    """adrpo-train in its own process (torchrun with ``processes`` > 1), in its own session."""
    argv = ["scripts/train_sd3.py", "--config", "configs/tiny_cpu.yaml", "--output_dir", str(out), "--max_steps",
            str(STEPS), "--checkpointing_steps", "4", *[str(a) for kv in LAUNCHED.items() for a in
                                                        (f"--{kv[0]}", json.dumps(kv[1]))], *args]
    prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, *prefix, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(process, timeout=300) -> tuple[int, str, float]:
    start = time.monotonic()
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err, time.monotonic() - start


def _steps_done(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_for_step(out, step, process, timeout=180):
    deadline = time.monotonic() + timeout
    while _steps_done(out) < step:
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the run did not reach step {step}:\n{process.communicate()[1][-3000:]}")
        time.sleep(0.05)


def _workers(process) -> list[int]:
    """The torchrun agent's worker processes."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        if len(children) == 2:
            return [int(pid) for pid in children]
        time.sleep(0.1)
    raise AssertionError("torchrun did not start two workers")


def _latest(out) -> Path:
    """The checkpoint ``--resume_from_checkpoint latest`` takes: the newest complete one (its manifest checks out)."""
    newest = list_checkpoints(out / "checkpoints")[-1][1]
    return resolve_resume("latest", out / "checkpoints", json.loads((newest / "manifest.json").read_text())["config"])


def _lora(out):
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture
def uninterrupted(shared_tmp_path, tiny_sd3_dir):
    """``uninterrupted(processes)``: the LoRA of the same run without a fault, on one process or two. Each is run
    once per test session, by the first test that needs it (pytest-xdist workers share it)."""
    def run(out, processes):
        code, err, _ = _finish(_launch(out, processes=processes))
        assert code == 0, err[-3000:]

    return lambda processes: _lora(build_once(shared_tmp_path / f"uninterrupted-{processes}",
                                              lambda out: run(out, processes)))


@pytest.mark.slow
def test_sigterm_stops_after_a_step_with_a_checkpoint_and_the_resumed_run_is_the_same(tmp_path, uninterrupted):
    out = tmp_path / "run"
    run = _launch(out)
    _wait_for_step(out, 5, run)
    run.send_signal(signal.SIGTERM)
    code, err, seconds = _finish(run, timeout=60)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    stopped_at = _steps_done(out)
    assert f"stopped by SIGTERM before step {stopped_at + 1}" in err and "Continue with:" in err
    assert "--resume_from_checkpoint latest" in err.split("Continue with:")[1]
    assert _latest(out).name == f"step-{stopped_at}"
    assert stopped_at < STEPS and seconds < 30  # one tiny step and a checkpoint, not the rest of the run

    code, err, _ = _finish(_launch(out, "--resume_from_checkpoint", "latest"))
    assert code == 0, err[-3000:]
    _assert_same(_lora(out), uninterrupted(1))


@pytest.mark.slow
def test_two_processes_stopped_by_sigusr1_then_one_killed_resume_to_the_same_run(tmp_path, uninterrupted):
    """A two-process run interrupted twice, resumed after each: SIGUSR1 to one process stops both at the same step
    with a checkpoint; later, one process killed ends the run at once. The LoRA is the uninterrupted run's."""
    out = tmp_path / "run"
    run = _launch(out, processes=2)
    _wait_for_step(out, 5, run)
    os.kill(_workers(run)[-1], signal.SIGUSR1)  # as SLURM's --signal=USR1 would, here to one process only
    code, err, seconds = _finish(run, timeout=120)
    assert code != 0 and seconds < 60, err[-3000:]
    stopped_at = _steps_done(out)
    assert f"stopped by SIGUSR1 before step {stopped_at + 1}" in err or "stopped by a stop signal on another" in err
    checkpoint = _latest(out)
    assert checkpoint.name == f"step-{stopped_at}"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()

    run = _launch(out, "--resume_from_checkpoint", "latest", processes=2)
    _wait_for_step(out, stopped_at + 6, run)  # past the next checkpoint (every 4 steps)
    os.kill(_workers(run)[-1], signal.SIGKILL)
    code, err, seconds = _finish(run, timeout=120)
    assert code != 0 and seconds < 60, err[-3000:]  # the other process does not wait for it forever
    assert int(_latest(out).name.removeprefix("step-")) > stopped_at  # the resumed run's own checkpoint

    code, err, _ = _finish(_launch(out, "--resume_from_checkpoint", "latest", processes=2))
    assert code == 0, err[-3000:]
    _assert_same(_lora(out), uninterrupted(2))


# ------------------------------------------------------------------------------------------------------ a full disk
def _config(out, **overrides):
    return load_config("configs/tiny_cpu.yaml", {**SMALL, "output_dir": str(out), **overrides})


def _fill_disk_at(monkeypatch, module, name, where):
    """``module.name`` writes a few bytes and then fails with ENOSPC when its path contains ``where``."""
    real = getattr(module, name)

    def full(obj, path, *args, **kwargs):
        if where in str(path):
            Path(path).write_bytes(b"\0" * 16)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, name, full)


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_leaves_nothing_partial(tmp_path, tiny_sd3_dir,
                                                                                    monkeypatch):
    out = tmp_path / "run"
    _fill_disk_at(monkeypatch, torch, "save", ".tmp-step-4")  # the optimizer state of the second checkpoint
    with pytest.raises(WriteFailed) as info:
        Trainer(_config(out, max_steps=6, checkpointing_steps=2)).train()
    message = str(info.value)
    assert f"could not write {out / 'checkpoints' / 'step-4'}: No space left on device (" in message
    assert "GiB free on its filesystem); the previous checkpoint" in message and "step-2, is intact" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # no partial step-4
    assert _latest(out).name == "step-2"  # complete


def test_a_full_disk_at_the_final_lora_leaves_no_partial_file(tmp_path, tiny_sd3_dir, monkeypatch):
    import safetensors.torch

    out = tmp_path / "run"
    _fill_disk_at(monkeypatch, safetensors.torch, "save_file", f"{out}/.tmp-lora-")  # not the checkpoints' copies
    with pytest.raises(WriteFailed, match=r"could not write .*pytorch_lora_weights.safetensors: No space left on device"):
        Trainer(_config(out, max_steps=2, checkpointing_steps=2)).train()
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not list(out.glob(".tmp-*"))
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [2]  # the training itself is kept


# -------------------------------------------------------------------------------------------------- failing rewards
def test_a_reward_that_raises_stops_the_run_with_the_last_completed_step_checkpointed(tmp_path, tiny_sd3_dir,
                                                                                      monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(_config(out, max_steps=6, checkpointing_steps=0))
    real, calls = trainer.scorer.score_parts, []

    def flaky(images, prompts):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise ConnectionError("reward server unreachable")
        return real(images, prompts)

    monkeypatch.setattr(trainer.scorer, "score_parts", flaky)
    with pytest.raises(RewardFailed, match="the reward failed at step 3: ConnectionError: reward server unreachable"):
        trainer.train()
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [2] and _steps_done(out) == 2


def test_groups_with_a_nan_reward_are_left_out_and_the_rest_trains(tmp_path, tiny_sd3_dir, monkeypatch, capsys):
    out = tmp_path / "run"
    trainer = Trainer(_config(out, max_steps=6, checkpointing_steps=0))
    real = trainer.scorer.score_parts
    broken = trainer.prompts[0]

    def nan_for_one_prompt(images, prompts):
        parts = real(images, prompts)
        return {name: torch.where(torch.tensor([p == broken for p in prompts]), float("nan"), v)
                for name, v in parts.items()}

    start = {k: v.clone() for k, v in trainer.transformer.named_parameters() if v.requires_grad}
    monkeypatch.setattr(trainer.scorer, "score_parts", nan_for_one_prompt)
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped_nonfinite"] == 0 and r["reward_nonfinite"] == r["samples_dropped"] for r in rows)
    assert any(r["reward_nonfinite"] == 4 for r in rows) and all(r["reward_mean"] == r["reward_mean"] for r in rows)
    assert capsys.readouterr().out.count("the reward was NaN or inf") == 1
    assert any(not torch.equal(v, start[k]) for k, v in trainer.transformer.named_parameters() if k in start)


@pytest.mark.parametrize("method", ["adrpo", "nft", "dpo", "raft"])
def test_a_plan_without_the_nan_groups_is_the_plan_of_the_batch_without_them(method):
    """Two processes of 8 samples, groups of 4; group 1 (on process 0) has a NaN: each process's plan equals the
    method's plan of the 12 other samples, mapped to its rows."""
    torch.manual_seed(0)
    rewards, groups = torch.rand(16), torch.arange(16) // 4
    rewards[5] = float("nan")
    method = build_method(method, {}, 4)
    kept = torch.tensor([i for i in range(16) if i // 4 != 1])
    expected = method.plan(rewards[kept], groups[kept], 0, 12)
    expected_units = expected.rows.view(-1, expected.unit)
    for rank, rows_of_rank in ((0, kept[kept < 8]), (1, kept[kept >= 8] - 8)):
        plan, dropped = plan_on_finite_groups(method, rewards, groups, rank, 8)
        assert dropped == 4 and plan.global_units == expected.global_units and plan.metrics == expected.metrics
        compact = torch.arange(12)[(kept < 8) if rank == 0 else (kept >= 8)]  # this process's samples among the 12
        mine = torch.isin(expected_units, compact).all(1)
        assert torch.equal(plan.rows, rows_of_rank[torch.searchsorted(compact, expected_units[mine])].flatten())
        for name, value in expected.values.items():
            assert torch.equal(plan.values[name][rows_of_rank], value[compact])


def test_checkpoint_every_minutes_writes_a_checkpoint_once_that_time_has_passed(tmp_path, tiny_sd3_dir):
    out = tmp_path / "run"
    Trainer(_config(out, max_steps=3, checkpointing_steps=0, checkpoints_total_limit=0,
                    checkpoint_every_minutes=1e-9)).train()  # always due: one before every step but the first
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [1, 2, 3]
    out = tmp_path / "run-hourly"
    Trainer(_config(out, max_steps=3, checkpointing_steps=0, checkpoints_total_limit=0,
                    checkpoint_every_minutes=60)).train()
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [3]  # only the final one
