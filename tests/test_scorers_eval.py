"""Evaluation scorers on tiny random models saved to disk and loaded back through each scorer's own loader,
checked against the definitions computed here by hand."""

import itertools
import json
import math

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from adrpo_diffusion.scorers import build_scorer
from adrpo_diffusion.scorers.diversity import clip_diversity
from adrpo_diffusion.testing.tiny_scorers import build_tiny_clip

PROMPTS = ["a red cube", "two cats on a sofa", "a blue sky over a very long and winding road"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIPModel (projection 16) and a CLIPProcessor (30 px crops, character tokenizer), saved."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def _images(n=3, height=40, width=48, seed=1):
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _clip_reference(path):
    return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)


def _image_embeds(model, processor, images):
    pixels = processor(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
    return model.get_image_features(pixel_values=pixels).pooler_output.numpy().astype(np.float64)


def _text_embeds(model, processor, prompts):
    text = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    return model.get_text_features(**text).pooler_output.numpy().astype(np.float64)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@torch.no_grad()
def test_aesthetic_matches_manual_mlp_on_normalised_clip_embedding(tiny_clip_dir, tmp_path):
    widths = [16, 12, 8, 6, 4, 1]  # a tiny head on the 16-wide tiny CLIP embedding
    generator = torch.Generator().manual_seed(2)
    state = {}
    for index, (inputs, outputs) in zip((0, 2, 4, 6, 7), itertools.pairwise(widths)):
        state[f"layers.{index}.weight"] = torch.randn(outputs, inputs, generator=generator)
        state[f"layers.{index}.bias"] = torch.randn(outputs, generator=generator)
    torch.save(state, tmp_path / "head.pth")
    images = _images()

    scorer = build_scorer("aesthetic", clip_model=str(tiny_clip_dir), checkpoint=str(tmp_path / "head.pth"),
                          device="cpu", batch_size=2)
    scores = scorer.score(images, PROMPTS)

    model, processor = _clip_reference(tiny_clip_dir)
    x = _unit(_image_embeds(model, processor, images))
    for index in (0, 2, 4, 6, 7):  # no activations; dropout is off at evaluation
        x = x @ state[f"layers.{index}.weight"].double().numpy().T + state[f"layers.{index}.bias"].double().numpy()
    assert scores.shape == (3,)
    np.testing.assert_allclose(scores.numpy(), x[:, 0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_pickscore_is_exp_logit_scale_times_cosine(tiny_clip_dir, tmp_path):
    model, processor = _clip_reference(tiny_clip_dir)
    model.logit_scale.fill_(math.log(100.0))  # the released value, instead of CLIP's initial 1/0.07
    model.save_pretrained(tmp_path / "pickscore")  # model and processor from different places, as released
    images = _images()

    scorer = build_scorer("pickscore", model=str(tmp_path / "pickscore"), processor=str(tiny_clip_dir),
                          device="cpu", batch_size=2)
    scores = scorer.score(images, PROMPTS)

    cos = (_unit(_image_embeds(model, processor, images)) * _unit(_text_embeds(model, processor, PROMPTS))).sum(-1)
    np.testing.assert_allclose(scores.numpy(), 100.0 * cos, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_clip_scorer_unchanged_and_image_embeddings(tiny_clip_dir):
    scorer = build_scorer("clip", model=str(tiny_clip_dir), device="cpu", batch_size=2)
    images = _images()
    model, processor = _clip_reference(tiny_clip_dir)
    image_embeds = _image_embeds(model, processor, images)

    np.testing.assert_allclose(scorer.image_embeddings(images).numpy(), image_embeds, rtol=1e-4, atol=1e-5)
    pil_images = [Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for image in images]
    assert scorer.image_embeddings(pil_images).shape == (3, 16)
    cos = (_unit(image_embeds) * _unit(_text_embeds(model, processor, PROMPTS))).sum(-1)
    np.testing.assert_allclose(scorer.score(images, PROMPTS).numpy(), 100.0 * cos, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip architecture registered under its own name, and a random model of it."""
    path = tmp_path_factory.mktemp("open_clip_config") / "adrpo-test-tiny-ViT.json"
    path.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        # the real BPE tokenizer: its ids need the full vocabulary
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }))
    open_clip.add_model_config(path)
    torch.manual_seed(3)
    return "adrpo-test-tiny-ViT", open_clip.create_model("adrpo-test-tiny-ViT").eval()


@torch.no_grad()
def _hps_reference(model, architecture, pil_images, prompts):
    """HPSv2's own recipe: open_clip's PIL transform (longest side resized, zero padding, OpenAI mean/std)."""
    transform = open_clip.image_transform(32, is_train=False, resize_mode="longest", fill_color=0)
    pixels = torch.stack([transform(image) for image in pil_images])
    image = model.encode_image(pixels).double().numpy()
    text = model.encode_text(open_clip.get_tokenizer(architecture)(prompts)).double().numpy()
    return (_unit(image) * _unit(text)).sum(-1)


@torch.no_grad()
def test_hpsv2_loads_both_checkpoint_layouts_and_matches_cosine(tiny_open_clip, tmp_path):
    architecture, model = tiny_open_clip
    torch.save({"state_dict": model.state_dict()}, tmp_path / "wrapped.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    images = _images(height=32, width=32)  # at the input size, so the preprocessing is only the normalisation
    pil_images = [Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                  for image in images]
    expected = _hps_reference(model, architecture, pil_images, PROMPTS)

    for name in ("wrapped.pt", "plain.pt"):
        scorer = build_scorer("hpsv2", checkpoint=str(tmp_path / name), architecture=architecture, device="cpu",
                              batch_size=2, scale=100.0)
        np.testing.assert_allclose(scorer.score(pil_images, PROMPTS).numpy(), 100.0 * expected, rtol=1e-4,
                                   atol=1e-3)


@torch.no_grad()
def test_hpsv2_preprocessing_of_non_square_images_follows_the_pil_reference(tiny_open_clip, tmp_path):
    architecture, model = tiny_open_clip
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps.pt")
    scorer = build_scorer("hpsv2", checkpoint=str(tmp_path / "hps.pt"), architecture=architecture, device="cpu")
    # smooth images: bicubic resizing of PIL (8-bit) and of torch (float) then differ only by rounding
    gradient = torch.linspace(0, 1, 96)
    images = torch.stack([torch.stack([gradient[None, :].expand(48, 96), gradient.flip(0)[None, :].expand(48, 96),
                                       torch.full((48, 96), shade)]) for shade in (0.2, 0.5, 0.8)])
    pil_images = [Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                  for image in images]

    transform = open_clip.image_transform(32, is_train=False, resize_mode="longest", fill_color=0)
    reference_pixels = torch.stack([transform(image) for image in pil_images])
    pixels = scorer.preprocess(images)
    assert pixels.shape == (3, 3, 32, 32)
    assert (pixels[:, :, :8] == reference_pixels[:, :, :8]).all()  # the black padding bands, 8 rows each
    assert (pixels - reference_pixels).abs().max() < 0.02  # about 1/255 in [0, 1] units
    np.testing.assert_allclose(scorer.score(images, PROMPTS).numpy(),
                               _hps_reference(model, architecture, pil_images, PROMPTS), atol=2e-3)


def _diversity_by_hand(embeddings, group_ids, distance, normalize, scale):
    per_group = []
    for group in dict.fromkeys(group_ids):
        members = [e for e, g in zip(embeddings, group_ids) if g == group]
        distances = []
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                a, b = members[i], members[j]
                if distance == "cosine":
                    distances.append(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
                else:
                    if normalize:
                        a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
                    distances.append(np.sqrt(((a - b) ** 2).sum()))
        per_group.append(scale * np.mean(distances))
    return np.mean(per_group)


@pytest.mark.parametrize("distance,normalize,scale", [("cosine", True, 1.0), ("cosine", False, 2.5),
                                                      ("l2", True, 1.0), ("l2", False, 0.5)])
def test_clip_diversity_matches_brute_force(distance, normalize, scale):
    rng = np.random.default_rng(4)
    embeddings = rng.normal(size=(12, 8)) * rng.uniform(0.5, 3.0, size=(12, 1))  # assorted norms
    group_ids = ["a", "b", "c"] * 2 + ["b", "c", "c", "c", "c", "a"]  # interleaved groups of 3, 3 and 6
    value = clip_diversity(torch.tensor(embeddings, dtype=torch.float32), group_ids, distance=distance,
                           normalize=normalize, scale=scale)
    assert value == pytest.approx(_diversity_by_hand(embeddings, group_ids, distance, normalize, scale), rel=1e-5)


def test_clip_diversity_variants_by_hand():
    """Two images with embeddings (3, 4) and (8, 6): norms 5 and 10, cos = (24 + 24) / 50 = 0.96."""
    pair = np.array([[3.0, 4.0], [8.0, 6.0]])
    assert clip_diversity(pair, [0, 0]) == pytest.approx(np.sqrt(5**2 + 2**2))  # default: unnormalised L2
    assert clip_diversity(pair, [0, 0], normalize=True) == pytest.approx(np.sqrt(2 * (1 - 0.96)))
    assert clip_diversity(pair, [0, 0], distance="cosine") == pytest.approx(0.04)
    assert clip_diversity(pair, [0, 0], distance="cosine", scale=100) == pytest.approx(4.0)


def test_clip_diversity_edge_cases():
    same = np.ones((4, 5))
    assert clip_diversity(same, [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert clip_diversity(opposite, [7, 7], distance="cosine") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2 images"):
        clip_diversity(np.eye(3), [0, 0, 1])
    with pytest.raises(ValueError, match="group ids"):
        clip_diversity(np.eye(3), [0, 0])
    with pytest.raises(ValueError, match="distance"):
        clip_diversity(np.eye(2), [0, 0], distance="manhattan")
    with pytest.raises(ValueError, match=r"Unknown ClipDiversity option\(s\) \['normalise'\]"):
        clip_diversity(np.eye(2), [0, 0], normalise=False)
    with pytest.raises(ValueError, match="scale must be a number > 0"):
        clip_diversity(np.eye(2), [0, 0], scale=0)


def test_missing_local_files_are_named(tiny_clip_dir, tmp_path):
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*missing\.pth"):
        build_scorer("aesthetic", clip_model=str(tiny_clip_dir), checkpoint=missing, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*missing\.pth"):
        build_scorer("hpsv2", checkpoint=missing, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"pass model="):
        build_scorer("pickscore", model=str(tmp_path / "no_model"), processor=str(tiny_clip_dir), device="cpu")
    with pytest.raises(FileNotFoundError, match=r"pass processor="):
        build_scorer("pickscore", processor=str(tmp_path / "no_processor"), device="cpu")


def test_missing_hub_files_offline_fail_before_loading_models(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    # The CLIP directory does not exist either: the head's error shows it is looked for first.
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*checkpoint="):
        build_scorer("aesthetic", clip_model=str(tmp_path / "no_clip"), device="cpu")
    with pytest.raises(FileNotFoundError, match=r"HPS_v2\.1_compressed\.pt.*xswu/HPSv2.*checkpoint="):
        build_scorer("hpsv2", architecture="no-such-architecture", device="cpu")


def test_evaluation_names_every_unreachable_scorer_model_before_anything_loads(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    from adrpo_diffusion.evaluation import cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(cli, "collect_images", None)  # nothing may be read or loaded
    argv = ["--config", "configs/eval_tiny_cpu.yaml", "--images_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
            "--metrics", "clipscore", "pickscore", "--reward_metric", "clipscore",
            "--metric_options", "{pickscore: {processor: builtin:tiny-scorers/pickscore}}"]
    assert cli.evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert ("metric clipscore: 'openai/clip-vit-large-patch14' is not a local directory and not in the hub cache, and "
            "HF_HUB_OFFLINE is set") in err
    assert "pass the directory: metric_options: {clipscore: {model: /models/clip-vit-large-patch14}}" in err
    assert "metric pickscore: 'yuvalkirstain/PickScore_v1'" in err and "{pickscore: {model: /models/PickScore_v1}}" in err
    assert "processor" not in err  # the built-in asset is fine


def test_a_scorer_checkpoint_that_would_run_code_is_refused_unrun(tmp_path, tiny_clip_dir):
    import pickle
    from pathlib import Path

    class RunsCode:
        def __reduce__(self):
            return Path.touch, (tmp_path / "code-ran",)

    crafted = tmp_path / "head.pth"
    torch.save({"layers.0.weight": RunsCode()}, crafted)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        build_scorer("aesthetic", device="cpu", checkpoint=str(crafted), clip_model=str(tiny_clip_dir))
    assert not (tmp_path / "code-ran").exists()
