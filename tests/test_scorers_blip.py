"""ImageReward and BLIPScore against the original implementation's outputs, on a small random-weight fixture
(``tests/fixtures/imagereward-tiny``, made by running PyPI ``image-reward`` 1.5 itself; see its README).

``ADRPO_IMAGEREWARD_FIXTURE=DIR`` runs the same tests on another fixture made the same way (for instance a larger
one, with vision and text width 64)."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from adrpo_diffusion.scorers import available_scorers, build_scorer

BUNDLED = Path(__file__).resolve().parent / "fixtures" / "imagereward-tiny"
FIXTURE = Path(os.environ.get("ADRPO_IMAGEREWARD_FIXTURE") or BUNDLED)
CHECKPOINTS = {"imagereward": FIXTURE / "ImageReward.pt", "blipscore": FIXTURE / "model_large.pth"}


def fixture_options(**overrides) -> dict:
    heads = json.loads((FIXTURE / "expected.json").read_text())["config"]["vision_heads"]  # not in the weights
    options = {"med_config": str(FIXTURE / "med_config.json"), "tokenizer": str(FIXTURE / "tokenizer"),
               "vision_heads": heads, "device": "cpu"}
    return {**options, **overrides}


@pytest.fixture(scope="module")
def expected() -> list[dict]:
    return json.loads((FIXTURE / "expected.json").read_text())["scores"]


@pytest.fixture(scope="module", params=["imagereward", "blipscore"])
def scorer(request):
    return request.param, build_scorer(request.param, checkpoint=str(CHECKPOINTS[request.param]), **fixture_options())


def test_registered():
    assert {"imagereward", "blipscore"} <= set(available_scorers())


def test_bundled_fixture_coverage(expected):
    """The bundled fixture keeps what makes it a test: the real vocabulary, a truncated prompt, every image used."""
    if FIXTURE != BUNDLED:
        pytest.skip(f"coverage checks are for the bundled fixture, not {FIXTURE}")
    assert json.loads((FIXTURE / "med_config.json").read_text())["vocab_size"] == 30524
    assert any(all(row["input_ids"]) for row in expected)  # 35 tokens, no padding: truncated
    assert {row["image"] for row in expected} == {path.name for path in (FIXTURE / "images").glob("*.png")}


def test_reproduces_original_scores(scorer, expected):
    name, model = scorer
    for image_name in sorted({row["image"] for row in expected}):
        rows = [row for row in expected if row["image"] == image_name]
        image = Image.open(FIXTURE / "images" / image_name)
        scores = model.score([image] * len(rows), [row["prompt"] for row in rows])
        # BLIPScore is a cosine near 0 with random weights: an absolute floor keeps float32 noise from failing it.
        assert scores.tolist() == pytest.approx([row[name] for row in rows], rel=1e-4, abs=1e-6), image_name


def test_token_ids(scorer, expected):
    _, model = scorer
    input_ids, attention_mask = model._tokens([row["prompt"] for row in expected])
    assert input_ids.tolist() == [row["input_ids"] for row in expected]
    assert attention_mask.tolist() == [[int(i != 0) for i in row["input_ids"]] for row in expected]


@pytest.mark.parametrize("name, remove, add, message", [
    ("imagereward", "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias", None,
     "lacks (model names): text.encoder.layer.1.crossattention.self.key.bias. "),
    ("imagereward", None, "blip.text_encoder.pooler.dense.weight", "nor ignored: blip.text_encoder.pooler.dense.weight"),
    # a layer beyond the med_config's depth
    ("imagereward", None, "blip.text_encoder.encoder.layer.7.output.dense.weight",
     "nor ignored: blip.text_encoder.encoder.layer.7.output.dense.weight"),
    ("blipscore", "text_proj.bias", None, "lacks (model names): text_proj.bias. "),
    ("blipscore", None, "visual_encoder.head.weight", "nor ignored: visual_encoder.head.weight"),
])
def test_key_accounting(tmp_path, name, remove, add, message):
    loaded = torch.load(CHECKPOINTS[name], map_location="cpu", weights_only=True)
    state = loaded["model"] if name == "blipscore" else loaded
    if remove:
        del state[remove]
    if add:
        state[add] = torch.zeros(1)
    path = tmp_path / CHECKPOINTS[name].name
    torch.save(loaded, path)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_scorer(name, checkpoint=str(path), **fixture_options())


@pytest.mark.parametrize("name, option", [
    ("imagereward", "checkpoint"), ("blipscore", "checkpoint"), ("imagereward", "med_config"),
    ("imagereward", "tokenizer"),
])
def test_missing_files_offline(monkeypatch, tmp_path, name, option):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch.hub cache for BLIP's URL
    options = fixture_options(checkpoint=str(CHECKPOINTS[name]))
    del options[option]  # back to the default: a hub id or URL, not cached here (tests run offline)
    with pytest.raises(FileNotFoundError, match=rf"pass its local path with the '{option}' option"):
        build_scorer(name, **options)


@pytest.mark.parametrize("height, width", [(224, 224), (224, 227), (224, 225), (229, 224), (327, 224), (224, 300)])
def test_center_crop_matches_torchvision(height, width):
    """The original crops with torchvision's CenterCrop: round(margin / 2), half to even (margin 3: offset 2, 5: 2)."""
    functional = pytest.importorskip("torchvision.transforms.functional", reason="torchvision is not installed")
    from adrpo_diffusion.scorers.blip import center_crop

    pixels = torch.arange(3 * height * width, dtype=torch.float32).reshape(1, 3, height, width)
    assert torch.equal(center_crop(pixels, 224), functional.center_crop(pixels, [224, 224]))
