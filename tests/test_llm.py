"""ADRPO on TRL's GRPO (adrpo_diffusion.llm). Needs the [llm] extra; CI installs only [test] and skips these."""

import importlib.util
import json
import sys
import warnings

import pytest

SKIP_REASON = "trl is not installed: the adrpo_diffusion.llm tests need `pip install -c constraints-ci.txt -e '.[llm]'`"
if importlib.util.find_spec("trl") is None:
    warnings.warn(SKIP_REASON, stacklevel=1)
pytest.importorskip("trl", reason=SKIP_REASON)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from adrpo_diffusion.llm import ADRPOGRPOConfig, ADRPOGRPOTrainer, adaptive_kl_coefficients, cli  # noqa: E402
from adrpo_diffusion.tasks.first_letter import first_letter_reward  # noqa: E402
from adrpo_diffusion.testing.tiny_language_models import build_tiny_lm  # noqa: E402

BETA0 = 0.04


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    return str(build_tiny_lm(tmp_path_factory.mktemp("tiny-lm")))


def make_trainer(cls, config_cls, model_dir, out_dir, loss_type, **kwargs):
    args = config_cls(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=5,
                      report_to="none", use_cpu=True, bf16=False, loss_type=loss_type, **kwargs)
    trainer = cls(model=model_dir, reward_funcs=first_letter_reward, args=args,
                  train_dataset=Dataset.from_dict({"prompt": ["abcd="] * 4}))
    trainer.model.eval()  # "eval" mode: no gradient-accumulation normaliser, which only the training loop sets
    # (bf16=False: TRL defaults to bf16 autocast, whose rounding would blur the exact comparisons below)
    return trainer


@pytest.fixture(scope="module", params=["dapo", "grpo"])
def trainers(request, tiny_lm_dir, tmp_path_factory):
    """(ADRPO with beta0 = 0.04, TRL's GRPO with beta = 0.04) on the same tiny model, for one loss_type."""
    out = tmp_path_factory.mktemp("out")
    adrpo = make_trainer(ADRPOGRPOTrainer, ADRPOGRPOConfig, tiny_lm_dir, out, request.param,
                         beta0=BETA0, advantage_min=-0.04, advantage_max=0.04)
    grpo = make_trainer(GRPOTrainer, GRPOConfig, tiny_lm_dir, out, request.param, beta=BETA0)
    return adrpo, grpo


def batch(trainer, advantages, kl_only_on=None):
    """A hand-made batch of 4 completions; the reference log-probs differ from the policy's on every completion,
    or only on completion ``kl_only_on`` (the others then have zero KL and zero KL gradient)."""
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(2, 11, (4, 3), generator=gen)
    completion_ids = torch.randint(2, 11, (4, 5), generator=gen)
    completion_mask = torch.ones(4, 5, dtype=torch.long)
    completion_mask[1, 3:] = 0
    prompt_mask = torch.ones_like(prompt_ids)
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), 5)[0]
    shift = 0.5 * torch.randn(4, 5, generator=gen)
    if kl_only_on is not None:
        shift[torch.arange(4) != kl_only_on] = 0.0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.as_tensor(advantages, dtype=torch.float32),
            "ref_per_token_logps": logps + shift, "num_items_in_batch": completion_mask.sum()}


def loss_and_grad(trainer, inputs, beta=None):
    """compute_loss and the flattened parameter gradient; ``beta`` sets a plain GRPOTrainer's KL coefficient."""
    if beta is not None:
        trainer.beta = beta
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grad


def test_adaptive_kl_coefficients():
    advantages = torch.tensor([[-2.0, -0.5, 0.0, 0.3, 3.0]])
    expected = torch.tensor([[1.0 + 1.0, 1.0 + 0.5, 1.0, 1.0 - 0.3, 1.0 - 1.0]])
    torch.testing.assert_close(adaptive_kl_coefficients(advantages, 1.0, -1.0, 1.0), expected)
    torch.testing.assert_close(adaptive_kl_coefficients(torch.zeros(3), 0.04, -0.04, 0.04), torch.full((3,), 0.04))


def test_zero_advantages_give_trls_grpo_loss_with_beta0(trainers):
    adrpo, grpo = trainers
    inputs = batch(adrpo, [0.0, 0.0, 0.0, 0.0])
    adrpo_loss, adrpo_grad = loss_and_grad(adrpo, inputs)
    grpo_loss, grpo_grad = loss_and_grad(grpo, inputs, beta=BETA0)
    assert adrpo_loss.abs() > 0  # the KL term is there
    torch.testing.assert_close(adrpo_loss, grpo_loss, rtol=0, atol=0)
    torch.testing.assert_close(adrpo_grad, grpo_grad)


@pytest.mark.parametrize("i", range(4))
def test_kl_gradient_scales_per_sample_as_beta0_minus_clipped_advantage(trainers, i):
    """Only completion i has a KL; its KL gradient (ADRPO's minus the policy-gradient part alone) is
    (beta0 - clip(A_i)) times the gradient of TRL's KL term with coefficient 1."""
    adrpo, grpo = trainers
    advantages = [-0.03, 0.5, 0.02, -1.2]  # inside and beyond the clip range [-0.04, 0.04]
    inputs = batch(adrpo, advantages, kl_only_on=i)
    _, adrpo_grad = loss_and_grad(adrpo, inputs)
    _, pg_grad = loss_and_grad(grpo, inputs, beta=0.0)
    _, kl_grad = loss_and_grad(grpo, {**inputs, "advantages": torch.zeros(4)}, beta=1.0)
    coefficient = BETA0 - min(max(advantages[i], -0.04), 0.04)
    assert kl_grad.norm() > 0
    torch.testing.assert_close(adrpo_grad - pg_grad, coefficient * kl_grad, rtol=1e-4, atol=1e-7)


def test_fails_loudly_when_trl_no_longer_multiplies_beta_into_the_kl(trainers, monkeypatch):
    adrpo, _ = trainers
    inputs = batch(adrpo, [0.0, 0.0, 0.0, 0.0])
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", lambda self, model, inputs: torch.zeros(()))
    with pytest.raises(RuntimeError, match="not supported by ADRPOGRPOTrainer"):
        adrpo.compute_loss(adrpo.model, inputs)
    assert adrpo.beta == BETA0  # restored

def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="beta0 must be > 0"):
        ADRPOGRPOConfig(output_dir=str(tmp_path), beta0=0.0, use_cpu=True)
    with pytest.raises(ValueError, match=r"advantage_min \(0.1\) must be < advantage_max \(0.1\)"):
        ADRPOGRPOConfig(output_dir=str(tmp_path), advantage_min=0.1, advantage_max=0.1, use_cpu=True)
    with pytest.warns(UserWarning, match="negative KL coefficient"):
        ADRPOGRPOConfig(output_dir=str(tmp_path), beta0=0.04, advantage_max=1.0, use_cpu=True)
    assert ADRPOGRPOConfig(output_dir=str(tmp_path), beta0=0.1, advantage_max=0.1, use_cpu=True).beta == 0.1


def test_cli_rejects_unknown_keys_with_the_valid_ones(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("beta_0: 0.1\n")
    assert cli.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'beta_0' (did you mean 'beta0'?)" in err and "Valid keys:" in err and "advantage_max" in err
    assert cli.main(["--config", "configs/tiny_llm_cpu.yaml", "--lerning_rate", "1"]) == 2
    assert "'lerning_rate' (did you mean 'learning_rate'?)" in capsys.readouterr().err


def test_cli_help_documents_the_keys(capsys, monkeypatch):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--compare_with_grpo" in out and "--reward_model" in out
    adrpo_keys = out.split("options:")[0]  # ADRPO's three keys before TRL's ~200, with their defaults
    assert "--beta0 (default 0.04)" in adrpo_keys and "--advantage_max (default 0.04)" in adrpo_keys
    assert "(default: Qwen/Qwen2-0.5B-Instruct)" in " ".join(out.split())  # argparse wraps lines

    monkeypatch.setitem(sys.modules, "trl", None)  # the Try-it install has no TRL: help still works and says why
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--reward_model" in out
    assert "pip install -c constraints-ci.txt -e '.[llm]'" in " ".join(out.split())
    assert cli.main(["--config", "configs/tiny_llm_cpu.yaml"]) == 2
    assert "adrpo-grpo needs TRL, the llm extra: pip install" in capsys.readouterr().err


def test_cli_refuses_an_output_dir_that_holds_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "train_one", None)  # nothing may be trained
    (tmp_path / "old-run.txt").write_text("a previous run")
    assert cli.main(["--config", "configs/tiny_llm_cpu.yaml", "--output_dir", str(tmp_path)]) == 2
    assert f"output_dir {tmp_path} already holds files" in capsys.readouterr().err


def test_cli_offline_error_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(cli, "train_one", None)  # nothing may be trained
    assert cli.main(["--config", "configs/qwen2_0.5b_rm_gemma.yaml", "--model_name_or_path", "nobody/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "'nobody/no-such-model' is not a local directory and not in the hub cache, and HF_HUB_OFFLINE is set" in err
    assert "and pass the directory: --model_name_or_path /models/no-such-model" in err
    assert cli.main(["--config", "configs/tiny_llm_cpu.yaml", "--beta0", "0"]) == 2
    assert "beta0 must be > 0" in capsys.readouterr().err


def test_demo_smoke(tmp_path, monkeypatch):
    """The offline demo at a tiny budget: both methods train, the summary and the plot are written."""
    monkeypatch.setenv("ADRPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert cli.main(["--config", "configs/tiny_llm_cpu.yaml", "--output_dir", str(out), "--max_steps", "2",
                     "--num_prompts", "40", "--eval_prompts", "8", "--eval_seeds", "0", "1", "--torch_num_threads", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "adrpo" and summary["steps"] == 2 and summary["heldout_samples"] == 16
    assert summary["grpo"]["heldout_reward_before"] == summary["heldout_reward_before"]  # same start, same seeds
    assert {"heldout_reward_after", "heldout_improvement", "heldout_improvement_se"} <= set(summary)
    assert (out / "reward_vs_entropy.png").stat().st_size > 0
