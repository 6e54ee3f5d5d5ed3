"""adrpo-push offline: the model card and upload folder of a real (1-step, tiny) run, and the Hub calls it would make
(huggingface_hub's HfApi methods replaced by recorders)."""

import dataclasses
import json
import shutil

import huggingface_hub
import pytest
import yaml

from adrpo_diffusion.checkpoint import LORA_WEIGHTS_NAME
from adrpo_diffusion.config import load_config
from adrpo_diffusion.hub import main, model_card
from adrpo_diffusion.trainer import Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_sd3_dir):
    out = tmp_path_factory.mktemp("run") / "tiny-adrpo"
    Trainer(load_config("configs/tiny_cpu.yaml", {
        "output_dir": str(out), "max_steps": 1, "prompts_per_step": 2, "images_per_prompt": 2, "eval_prompts": 2,
        "eval_seeds": [1000], "checkpointing_steps": 0, "sample_every": 0, "report_to": "none"})).train()
    return out


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


@pytest.fixture
def hub_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)) or f"https://hf.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(
        ("upload_folder", kw["repo_id"], sorted(p.relative_to(kw["folder_path"]).as_posix()
                                                for p in kw["folder_path"].rglob("*") if p.is_file()))))
    return calls


def test_push_uploads_the_lora_the_card_and_the_samples(run_dir, hub_calls, capsys):
    assert main([str(run_dir), "--repo_id", "me/tiny-adrpo", "--private"]) == 0
    files = ["README.md", "config.json", LORA_WEIGHTS_NAME, "samples/final.png", "summary.json"]
    assert hub_calls == [("create_repo", "me/tiny-adrpo", {"private": True, "exist_ok": True}),
                         ("upload_folder", "me/tiny-adrpo", files)]
    assert "Uploaded to https://hf.co/me/tiny-adrpo" in capsys.readouterr().out
    assert (run_dir / "hub" / LORA_WEIGHTS_NAME).read_bytes() == (run_dir / LORA_WEIGHTS_NAME).read_bytes()

    readme = (run_dir / "hub" / "README.md").read_text()
    front = _front_matter(readme)
    assert front["library_name"] == "diffusers" and front["tags"] == ["lora", "text-to-image", "diffusers", "adrpo"]
    assert "base_model" not in front and front["license"] == "other"  # builtin:tiny-sd3 is no hub id
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"before {summary['heldout_reward_before']:.4f} -> after {summary['heldout_reward_after']:.4f}" in readme
    assert f"± {summary['heldout_improvement_se']:.4f}" in readme and "![samples](samples/final.png)" in readme
    assert '"beta0": 1.0' in readme and 'pipe.load_lora_weights("me/tiny-adrpo")' in readme
    assert f"one column per seed ({summary['heldout_prompts']})" in readme  # what the grid shows, from summary.json
    uploaded = json.loads((run_dir / "hub" / "config.json").read_text())
    assert "resume_from_checkpoint" not in uploaded and "output_dir" not in uploaded and uploaded["lora_rank"] == 8


def test_the_cards_snippet_runs_and_loads_the_lora(run_dir, hub_calls):
    """The card's Python, as a user copies it, with the hub id pointing at the upload folder (diffusers loads a LoRA
    from a local folder like from a hub repository)."""
    main([str(run_dir), "--repo_id", "me/tiny-adrpo", "--dry_run"])
    readme = (run_dir / "hub" / "README.md").read_text()
    snippet = readme.split("```python\n")[1].split("```")[0].replace('"me/tiny-adrpo"', repr(str(run_dir / "hub")))
    assert "torch_dtype" not in snippet
    scope = {}
    exec(snippet, scope)
    image, pipe = scope["image"], scope["pipe"]
    assert image.size == (32, 32)
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_dry_run_writes_the_folder_and_uploads_nothing(run_dir, tmp_path, hub_calls, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no login needed for a dry run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("hub", "summary.json", "samples"))
    assert main([str(run), "--repo_id", "me/x", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "Dry run: would upload" in out and "README.md" in out and LORA_WEIGHTS_NAME in out and not hub_calls
    readme = (run / "hub" / "README.md").read_text()
    assert "**Held-out reward** (`color`): not measured" in readme and "## Samples" not in readme


def test_errors_come_before_any_work(run_dir, tmp_path, hub_calls, monkeypatch, capsys):
    assert main([str(tmp_path), "--repo_id", "me/x"]) == 2
    assert f"{tmp_path} has no {LORA_WEIGHTS_NAME}: adrpo-train writes it" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("hub"))
    assert main([str(run), "--repo_id", "me/x"]) == 2
    assert "Not logged in to the Hugging Face Hub: run `hf auth login`" in capsys.readouterr().err
    assert not (run / "hub").exists() and not hub_calls


def test_card_of_an_sd3_run_names_its_base_and_license(run_dir):
    config = {**json.loads((run_dir / "config.json").read_text()), "method": "raft", "method_options": {"top_k": 1},
              "pretrained_model": "stabilityai/stable-diffusion-3-medium-diffusers"}
    card = model_card(config, None, "me/sd3-raft", has_samples=False)
    front = _front_matter(card)
    assert front["base_model"] == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert front["license_name"] == "stabilityai-ai-community" and "raft" in front["tags"]
    assert "StableDiffusion3Pipeline.from_pretrained" in card and '`{"top_k": 1}`' in card


def test_card_writes_a_reward_mapping_as_its_weighted_sum():
    config = dataclasses.asdict(load_config("configs/tiny_shapes_cpu.yaml", {
        "reward": {"color": 1.0, "shapes": 0.5, "clip": -0.25}, "reward_options": {"clip": {"model": "DIR"}}}))
    card = model_card(config, None, "me/shapes", has_samples=False)
    assert '- reward: `1 x color + 0.5 x shapes - 0.25 x clip` x 1, options `{"clip": {"model": "DIR"}}`' in card
    assert "**Held-out reward** (`1 x color + 0.5 x shapes - 0.25 x clip`): not measured" in card
