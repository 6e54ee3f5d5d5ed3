"""Audio in TRL's GRPO (adrpo_diffusion.llm.audio_trainer) on a tiny Qwen2.5-Omni thinker built offline."""

import pytest

pytest.importorskip("trl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from adrpo_diffusion.llm import ADRPOGRPOConfig, audio_trainer  # noqa: E402
from adrpo_diffusion.llm.answers import first_character_reward as pitch_reward  # noqa: E402
from adrpo_diffusion.llm.audio_trainer import AudioADRPOGRPOTrainer, AudioGRPOTrainer, check_trl_signatures  # noqa: E402
from adrpo_diffusion.tasks.pitch import pitch_rows  # noqa: E402
from adrpo_diffusion.testing.tiny_language_models import build_tiny_omni, build_tiny_qwen2_audio  # noqa: E402

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


@pytest.fixture(scope="module", params=["qwen2.5-omni-thinker", "qwen2-audio"])
def trainers(request, omni_dir, tmp_path_factory):
    """(audio ADRPO with beta0 = 0.04, audio GRPO with beta = 0.04) on a tiny Qwen2.5-Omni thinker, or on a tiny
    Qwen2-Audio (whose config has no image token, which TRL's __init__ reads)."""
    if request.param == "qwen2-audio":
        model_dir = str(build_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny-qwen2-audio")))
    else:
        model_dir = omni_dir
    out, rows = tmp_path_factory.mktemp("out"), pitch_rows(4)
    adrpo = make_trainer(AudioADRPOGRPOTrainer, ADRPOGRPOConfig, model_dir, out, rows, beta0=BETA0,
                         advantage_min=-0.04, advantage_max=0.04)
    grpo = make_trainer(AudioGRPOTrainer, GRPOConfig, model_dir, out, rows, beta=BETA0)
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
    placeholders = [tokenizer.audio_token_id]
    if hasattr(model.config, "image_token_id"):  # the Omni thinker's; Qwen2-Audio has only the audio token
        placeholders += [tokenizer.image_token_id, tokenizer.video_token_id]
    assert trainer.suppressed_tokens == sorted(placeholders)
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


@pytest.mark.slow
def test_training_learns_to_answer_from_the_audio(omni_dir, tmp_path):
    """150 ADRPO-GRPO steps on the pitch task raise held-out accuracy from about 0.05 to about 0.6 (chance among
    the three answers: 1/3; seeds 0 and 42 reached 0.65 at 200 steps). Every prompt's text is the same, so only the
    audio can tell; with each clip swapped for the next row's (always another class) the same samples lose much of
    it: the answers follow the audio. The check is that paired drop, not a level below chance: one CPU measured 0.66,
    and 0.33 with the clips swapped (a drop of 0.33, about 8 SE), near chance itself with 128 samples."""
    from adrpo_diffusion.llm.cli import heldout_completion_rewards
    from adrpo_diffusion.utils import paired_change

    torch.manual_seed(0)
    rows = pitch_rows(1024 + 64)
    args = ADRPOGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=32, num_generations=8,
                           max_completion_length=1, learning_rate=5e-3, lr_scheduler_type="constant", max_steps=150,
                           report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False,
                           save_strategy="no", disable_tqdm=True, logging_steps=10, seed=0)
    trainer = AudioADRPOGRPOTrainer(model=omni_dir, reward_funcs=pitch_reward, args=args,
                                    train_dataset=Dataset.from_list(rows[:1024]))
    heldout = rows[1024:]
    before = heldout_completion_rewards(trainer, heldout, [0, 1]).mean().item()
    trainer.train()
    correct = heldout_completion_rewards(trainer, heldout, [0, 1])
    swapped = [{**row, "audio": heldout[(i + 1) % len(heldout)]["audio"]} for i, row in enumerate(heldout)]
    assert before < 0.2 and correct.mean() > 0.5, (before, correct.mean())
    # paired over the same rows and seeds: the drop is the mean of correct - swapped, with its standard error
    change = paired_change(heldout_completion_rewards(trainer, swapped, [0, 1]), correct)
    drop, se = change["improvement"], change["improvement_se"]
    assert drop > 0.15 and drop > 3 * se, (drop, se)


def write_mmau(root, tasks):
    """An MMAU-format file with one real wav clip (16 kHz, 0.5 s tone) per question."""
    import soundfile

    records = []
    for i, (task, difficulty) in enumerate(tasks):
        audio_id = f"./test-mini-audios/clip{i}.wav"
        (root / "test-mini-audios").mkdir(parents=True, exist_ok=True)
        t = np.arange(8000) / 16000
        soundfile.write(str(root / audio_id), (0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t)).astype(np.float32), 16000)
        records.append({"id": f"q{i}", "audio_id": audio_id, "question": "Which instrument plays?",
                        "choices": ["Piano", "Drums", "Flute"], "answer": "Drums", "task": task,
                        "difficulty": difficulty, "sub-category": "Instrument", "category": "Music"})
    path = root / "mmau-test-mini.json"
    path.write_text(__import__("json").dumps(records))
    return path


def test_mmau_evaluation_end_to_end(tmp_path, monkeypatch, capsys):
    """adrpo-audio-eval on an MMAU-format file with real wav files: the built-in tiny thinker answers every question
    (greedy), unanswered items count as wrong, and the table's counts and accuracies follow the predictions."""
    import json

    from adrpo_diffusion.llm import audio_eval
    from adrpo_diffusion.llm.answers import string_match

    monkeypatch.setenv("ADRPO_CACHE", str(tmp_path / "cache"))
    tasks = [("sound", "easy"), ("music", "hard"), ("music", "easy"), ("speech", "medium"), ("sound", "hard")]
    mmau = write_mmau(tmp_path / "mmau", tasks)
    out = tmp_path / "eval"
    assert audio_eval.main(["--model", "builtin:tiny-omni-thinker", "--mmau_json", str(mmau), "--output_dir", str(out),
                            "--batch_size", "2", "--max_new_tokens", "6", "--dtype", "float32"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(5)]
    for r in records:
        assert r["correct"] == (r["answer"] is not None and string_match("Drums", r["answer"], ["Piano", "Drums", "Flute"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["questions"] == 5 and summary["unanswered"] == sum(r["answer"] is None for r in records)
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 5
    by_task = {row["value"]: row["n"] for row in summary["table"] if row["group"] == "task"}
    assert by_task == {"music": 2, "sound": 2, "speech": 1}
    assert "| task | music | 2 |" in (out / "accuracy.md").read_text()
    assert "accuracy" in capsys.readouterr().out


def test_mmau_evaluation_names_a_missing_clip_before_loading(tmp_path, capsys):
    from adrpo_diffusion.llm import audio_eval

    mmau = write_mmau(tmp_path, [("sound", "easy"), ("music", "hard")])
    (tmp_path / "test-mini-audios" / "clip1.wav").unlink()
    assert audio_eval.main(["--model", "/nonexistent/model", "--mmau_json", str(mmau), "--output_dir",
                            str(tmp_path / "o")]) == 2
    assert "clip1.wav" in capsys.readouterr().err


def test_demo_config_smoke(tmp_path, monkeypatch):
    """configs/tiny_audio_cpu.yaml at a tiny budget: both methods train on the audio task, the summary carries the
    held-out scores and the swapped-audio check."""
    import json

    from adrpo_diffusion.llm import cli

    monkeypatch.setenv("ADRPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert cli.main(["--config", "configs/tiny_audio_cpu.yaml", "--output_dir", str(out), "--max_steps", "2",
                     "--num_prompts", "40", "--eval_prompts", "8", "--eval_seeds", "0", "--torch_num_threads", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["heldout_samples"] == 8
    assert 0 <= summary["heldout_reward_audio_swapped"] <= 1 and "heldout_reward_audio_swapped" in summary["grpo"]


def test_avqa_training_run(tmp_path, monkeypatch):
    """adrpo-grpo on AVQA-format data (train_qa.json + extracted wav clips at 22.05 kHz, resampled) with the R1
    accuracy and format rewards: one ADRPO step of LoRA adapters on the language model of the tiny thinker (the
    reference: adapters off), and adrpo-audio-eval takes the saved adapter."""
    import json

    import soundfile

    from adrpo_diffusion.llm import cli

    monkeypatch.setenv("ADRPO_CACHE", str(tmp_path / "cache"))
    records = []
    for i in range(6):
        t = np.arange(11025) / 22050
        soundfile.write(str(tmp_path / f"video{i}.wav"), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
        records.append({"id": i, "video_name": f"video{i}", "video_id": i, "question_text": "What makes the sound?",
                        "multi_choice": ["a dog", "a car", "a violin", "rain"], "answer": i % 4,
                        "question_relation": "Both" if i else "View", "question_type": "Which"})
    (tmp_path / "train_qa.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    assert cli.main(["--model_name_or_path", "builtin:tiny-omni-thinker", "--dataset_name", str(tmp_path / "train_qa.json"),
                     "--dataset_format", "avqa", "--audio_dir", str(tmp_path), "--reward_model",
                     "builtin:answer-accuracy-format", "--eval_prompts", "1", "--eval_seeds", "0", "1", "--output_dir", str(out),
                     "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4",
                     "--max_completion_length", "4", "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
                     "--save_strategy", "no", "--activation_checkpointing", "false", "--lora_rank", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["heldout_samples"] == 2  # 1 held-out question x 2 seeds
    adapter = json.loads((out / "adrpo" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and "audio_tower" in adapter["target_modules"]  # excluded by the pattern
    from safetensors import safe_open

    with safe_open(str(out / "adrpo" / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and all("language_model" in name for name in names)
    from adrpo_diffusion.llm import audio_eval

    mmau = write_mmau(tmp_path / "mmau", [("sound", "easy"), ("music", "hard")])
    assert audio_eval.main(["--model", "builtin:tiny-omni-thinker", "--adapter", str(out / "adrpo"), "--mmau_json",
                            str(mmau), "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "4",
                            "--dtype", "float32"]) == 0


@pytest.mark.parametrize("config", ["configs/qwen2.5_omni_7b_avqa.yaml", "configs/qwen2_audio_7b_avqa.yaml"])
def test_paper_audio_configs_parse_and_name_the_missing_model_offline(config, tmp_path, capsys):
    from adrpo_diffusion.llm import cli

    run, trainer_kwargs = cli.parse_args(["--config", config])
    assert (run.dataset_format, run.reward_model, run.lora_rank) == ("avqa", "builtin:answer-accuracy-format", 64)
    assert (trainer_kwargs["beta0"], trainer_kwargs["advantage_min"], trainer_kwargs["advantage_max"]) == (0.04, -0.04, 0.04)
    assert cli.main(["--config", config, "--output_dir", str(tmp_path / "out")]) == 2
    assert run.model_name_or_path in capsys.readouterr().err
