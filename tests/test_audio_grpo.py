"""Audio in TRL's GRPO (adrpo_diffusion.llm.audio_trainer) on a tiny Qwen2.5-Omni thinker built offline."""

import pytest

pytest.importorskip("trl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from adrpo_diffusion.llm import ADRPOGRPOConfig, audio_trainer  # noqa: E402
from adrpo_diffusion.llm.audio_trainer import AudioADRPOGRPOTrainer, AudioGRPOTrainer, check_trl_signatures  # noqa: E402
from adrpo_diffusion.llm.tiny_audio import build_tiny_omni, pitch_reward, pitch_rows  # noqa: E402

BETA0 = 0.04


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory):
    return str(build_tiny_omni(tmp_path_factory.mktemp("tiny-omni")))


def make_trainer(cls, config_cls, model_dir, out_dir, rows, **kwargs):
    args = config_cls(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=3,
                      report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False, **kwargs)
    trainer = cls(model=model_dir, reward_funcs=pitch_reward, args=args, train_dataset=Dataset.from_list(rows))
    trainer.model.eval()  # no gradient-accumulation normaliser (only the training loop sets it), no dropout
    return trainer


@pytest.fixture(scope="module")
def trainers(omni_dir, tmp_path_factory):
    out, rows = tmp_path_factory.mktemp("out"), pitch_rows(4)
    adrpo = make_trainer(AudioADRPOGRPOTrainer, ADRPOGRPOConfig, omni_dir, out, rows, beta0=BETA0,
                         advantage_min=-0.04, advantage_max=0.04)
    grpo = make_trainer(AudioGRPOTrainer, GRPOConfig, omni_dir, out, rows, beta=BETA0)
    return adrpo, grpo


def generated_batch(trainer, rows):
    """TRL's own batch for ``rows`` (generation, rewards, reference log-probs), with the audio inputs added."""
    torch.manual_seed(0)
    with torch.no_grad():
        return trainer._generate_and_score_completions([dict(r) for r in rows])


def reference_logps(model, processor, row, completion: list[int]) -> torch.Tensor:
    """Log-probs of ``completion`` from one unpadded forward of ``row`` alone, through the model's own logits."""
    text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], audio=[np.asarray(row["audio"], dtype=np.float32)], return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.tensor([completion])], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=enc["input_features"],
                       feature_attention_mask=enc["feature_attention_mask"]).logits
    logps = logits[0, -len(completion) - 1:-1].log_softmax(-1)
    return logps.gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_batched_left_padded_logps_equal_per_example_unpadded_forwards(trainers):
    """Clips of different lengths give prompts of different lengths: the batch is left-padded, and the log-probs TRL
    trains on (here the policy's, as in the loss, in chunks of 3 rows) equal each example's own forward."""
    trainer, _ = trainers
    rows = pitch_rows(8, seed=3)[::2]  # 4 clips of different lengths
    batch = generated_batch(trainer, rows)
    assert batch["prompt_mask"].min() == 0  # really left-padded
    assert batch["input_features"].shape[0] == 4 and batch["feature_attention_mask"].shape[0] == 4
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    trainer._audio_rows = {k: batch[k] for k in audio_trainer.AUDIO_INPUTS}
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, batch["completion_ids"].size(1),
                                                           batch_size=3)[0]
    trainer._audio_rows = None
    model = trainer.accelerator.unwrap_model(trainer.model)
    for i, row in enumerate(rows):
        n = int(batch["completion_mask"][i].sum())
        expected = reference_logps(model, trainer.processing_class, row, batch["completion_ids"][i, :n].tolist())
        torch.testing.assert_close(logps[i, :n], expected, rtol=1e-4, atol=1e-5)
    # the reference log-probs TRL computed during generation saw the same audio (policy == reference here)
    torch.testing.assert_close(batch["ref_per_token_logps"] * mask[:, -logps.size(1):],
                               logps * mask[:, -logps.size(1):], rtol=1e-4, atol=1e-5)


def test_zero_advantages_give_grpos_loss_with_beta0(trainers):
    adrpo, grpo = trainers
    batch = generated_batch(adrpo, pitch_rows(4, seed=1))
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    batch["ref_per_token_logps"] = batch["ref_per_token_logps"] + 0.3  # a KL term that is not zero
    losses, grads = [], []
    for trainer in (adrpo, grpo):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    assert losses[0].abs() > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1])


def test_placeholder_tokens_are_out_of_the_trained_distribution(trainers):
    """The audio, image and video placeholders get probability 0 in the model itself, so the entropy and
    log-probs TRL trains on are those of the distribution generation samples from (renormalised without them)."""
    trainer, _ = trainers
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = trainer.processing_class.tokenizer
    assert trainer.suppressed_tokens == sorted([tokenizer.audio_token_id, tokenizer.image_token_id,
                                                tokenizer.video_token_id])
    assert trainer.generation_config.suppress_tokens == trainer.suppressed_tokens
    ids = torch.tensor([[1, 10, 11]])
    with torch.no_grad():
        probs = model(input_ids=ids).logits.softmax(-1)
    assert probs[..., trainer.suppressed_tokens].max() < 1e-30
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 3))
    assert not any("bias" in k for k in model.get_output_embeddings().state_dict())  # never saved


def test_guard_fails_when_trl_changes_an_overridden_method(monkeypatch):
    check_trl_signatures()
    monkeypatch.setattr(GRPOTrainer, "_tokenize_prompts", lambda self, prompts, extra: None)
    with pytest.raises(RuntimeError, match="_tokenize_prompts"):
        check_trl_signatures()


def test_training_learns_to_answer_from_the_audio(omni_dir, tmp_path):
    """150 ADRPO-GRPO steps on the pitch task raise held-out accuracy from about 0.05 to about 0.6 (chance among
    the three answers: 1/3; seeds 0 and 42 reached 0.65 at 200 steps); with each clip swapped for the next row's
    (always another class) it falls below chance: the answers follow the audio."""
    from adrpo_diffusion.llm.cli import heldout_rewards

    torch.manual_seed(0)
    rows = pitch_rows(1024 + 64)
    args = ADRPOGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=32, num_generations=8,
                           max_completion_length=1, learning_rate=5e-3, lr_scheduler_type="constant", max_steps=150,
                           report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False,
                           save_strategy="no", disable_tqdm=True, logging_steps=10, seed=0)
    trainer = AudioADRPOGRPOTrainer(model=omni_dir, reward_funcs=pitch_reward, args=args,
                                    train_dataset=Dataset.from_list(rows[:1024]))
    heldout = rows[1024:]
    before = heldout_rewards(trainer, heldout, [0, 1]).mean().item()
    trainer.train()
    accuracy = heldout_rewards(trainer, heldout, [0, 1]).mean().item()
    swapped = [{**row, "audio": heldout[(i + 1) % len(heldout)]["audio"]} for i, row in enumerate(heldout)]
    swapped_accuracy = heldout_rewards(trainer, swapped, [0, 1]).mean().item()
    assert before < 0.2 and accuracy > 0.5, (before, accuracy)
    assert swapped_accuracy < 0.3, swapped_accuracy
