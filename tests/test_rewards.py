"""Several rewards: R = sum_k w_k * scorer_k(image, prompt) with the dependency-free color and shapes scorers, and the
config, command line and errors of a reward mapping."""

import pytest
import torch

from adrpo_diffusion.config import ConfigError, config_from_args, load_config
from adrpo_diffusion.scorers import WeightedReward, build_reward, build_scorer, check_reward, reward_parts
from adrpo_diffusion.tasks.shapes import sample_batch

CAPTIONS = ["a red circle", "a blue square", "two yellow triangles", "a green triangle at the top"]  # both can score


@pytest.fixture(scope="module")
def batch():
    """Drawn shapes with noise on top, so that both scorers give scores that differ between images."""
    generator = torch.Generator().manual_seed(0)
    images, prompts = sample_batch(8, generator, captions=CAPTIONS)
    noise = 0.2 * torch.randn(images.shape, generator=generator)
    return (images + noise).clamp(0, 1), prompts


def test_weighted_sum_of_the_raw_parts(batch):
    images, prompts = batch
    reward = build_reward({"color": 1.0, "shapes": -0.5}, {"shapes": {"batch_size": 3}})
    assert isinstance(reward, WeightedReward)
    assert reward.names == ["color", "shapes"] and reward.weights == {"color": 1.0, "shapes": -0.5}
    color, shapes = build_scorer("color").score(images, prompts), build_scorer("shapes").score(images, prompts)
    assert color.std() > 0.01 and shapes.std() > 0.01  # the test can tell the parts apart

    parts = reward.score_parts(images, prompts)
    assert list(parts) == ["color", "shapes"]
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and p.shape == (8,) for p in parts.values())
    torch.testing.assert_close(parts["color"], color, rtol=0, atol=0)
    torch.testing.assert_close(parts["shapes"], shapes, rtol=0, atol=1e-6)  # other batches: same values
    torch.testing.assert_close(reward.combine(parts), 1.0 * color - 0.5 * shapes, rtol=0, atol=1e-6)
    torch.testing.assert_close(reward.score(images, prompts), 1.0 * color - 0.5 * shapes, rtol=0, atol=1e-6)
    assert reward.to("cpu") is reward


def test_score_checks_gives_the_parts_once_and_each_check_as_a_component(batch):
    """score_checks: the same parts as score_parts, with the shapes score taken from its checks (computed once); the
    components are each shapes check with the part's weight and the color score itself (no checks)."""
    images, prompts = batch
    reward = build_reward({"color": 1.0, "shapes": -0.5}, {})
    parts, components = reward.score_checks(images, prompts)
    expected = reward.score_parts(images, prompts)
    assert list(parts) == list(expected)
    for name in parts:
        torch.testing.assert_close(parts[name], expected[name], rtol=0, atol=0)
    checks = build_scorer("shapes").checks(images, prompts)
    assert [w for w, _ in components] == [1.0] + [-0.5] * len(checks)
    torch.testing.assert_close(components[0][1], expected["color"], rtol=0, atol=0)
    for (_, component), check in zip(components[1:], checks.values()):
        torch.testing.assert_close(component, check, rtol=0, atol=0, equal_nan=True)
    positioned = torch.tensor([" at the " in prompt for prompt in prompts])  # the position check applies to these
    assert positioned.any() and not positioned.all() and torch.equal(~components[-1][1].isnan(), positioned)


def test_pil_images_score_like_the_tensor(batch):
    from PIL import Image

    images, prompts = batch
    pixels = (images * 255).round().byte()
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]
    reward = build_reward({"color": 2, "shapes": 1}, {})
    torch.testing.assert_close(reward.score(pil, prompts), reward.score(pixels / 255.0, prompts), rtol=0, atol=1e-6)


def test_a_single_name_is_one_part_of_weight_one(batch):
    images, prompts = batch
    assert reward_parts("shapes", {"batch_size": 4}) == {"shapes": (1.0, {"batch_size": 4})}
    reward = build_reward("shapes", {"batch_size": 4})
    assert reward.weights == {"shapes": 1.0}
    assert torch.equal(reward.score(images, prompts), build_scorer("shapes", batch_size=4).score(images, prompts))


def test_a_mapping_keys_its_options_by_scorer_name():
    assert reward_parts({"color": 1, "shapes": 0.5}, {"shapes": {"batch_size": 4}}) == {
        "color": (1.0, {}), "shapes": (0.5, {"batch_size": 4})}
    assert isinstance(reward_parts({"color": 1}, {})["color"][0], float)


@pytest.mark.parametrize(
    "reward, options, messages",
    [
        ({}, {}, ["reward is an empty mapping"]),
        ({"color": "high"}, {}, ["weight of reward 'color' must be a finite number, got 'high'"]),
        ({"color": True}, {}, ["weight of reward 'color' must be a finite number, got True"]),
        ({"color": float("inf")}, {}, ["weight of reward 'color' must be a finite number, got inf"]),
        ({"color": 1.0, "shapes": 0}, {}, ["weight of reward 'shapes' is 0: drop it instead"]),
        ({"color": 0, "shapes": 0.0}, {}, ["weight of reward 'color' is 0", "weight of reward 'shapes' is 0"]),
        ({"colour": 1.0, "shapes": 1.0}, {}, ["Unknown scorer 'colour' (did you mean 'color'?)", "available: aesthetic"]),
        ("colr", {}, ["Unknown scorer 'colr' (did you mean 'color'?)"]),
        ({"color": 1.0}, {"batch_size": 4}, ["reward_options key(s) 'batch_size' are not scorers of the reward ['color']",
                                             "keyed by scorer name, e.g. {clip: {model: DIR}}"]),
        ({"color": 1.0, "shapes": 1.0}, {"shape": {}}, ["'shape' (did you mean 'shapes'?)"]),
        ({"color": 1.0}, {"color": 4}, ["reward_options['color'] must be a mapping of color's options, got 4"]),
        ({"color": 1.0}, [], ["reward_options must be a mapping, got []"]),
        (["color"], {}, ["reward must be a scorer name or a mapping of scorer names to weights"]),
        ({1: 1.0}, {}, ["reward's keys must be scorer names"]),
    ],
)
def test_bad_rewards_are_named(reward, options, messages):
    with pytest.raises(ValueError) as info:
        reward_parts(reward, options)
    for message in messages:
        assert message in str(info.value), str(info.value)


def test_every_problem_of_a_mapping_at_once():
    with pytest.raises(ValueError) as info:
        reward_parts({"colr": 1.0, "shapes": 0}, {"model": "DIR"})
    assert str(info.value).splitlines()[0].startswith("Unknown scorer 'colr'")
    assert len(str(info.value).splitlines()) == 3 and "'shapes' is 0" in str(info.value) and "'model'" in str(info.value)


def test_check_reward_checks_each_part_before_any_model_loads():
    assert check_reward({"color": 1, "shapes": 1}, {}, CAPTIONS) == {"color": (1.0, {}), "shapes": (1.0, {})}
    with pytest.raises(ValueError) as info:
        check_reward({"color": 1, "shapes": 1}, {"color": {"size": 3}}, ["a red apple"])
    assert "Unknown option(s) ['size'] for scorer 'color'" in str(info.value)
    assert "The shapes reward scores captions of the shapes grammar only" in str(info.value)
    with pytest.raises(ValueError, match="needs a colour word"):
        check_reward({"color": 1, "shapes": 1}, {}, ["two blue squares", "three circles"])
    with pytest.raises(ValueError, match="weight of reward 'color' is 0"):
        build_reward({"color": 0}, {})


def test_config_and_command_line_take_a_mapping():
    cfg = load_config("configs/tiny_shapes_cpu.yaml", {"reward": {"color": 1.0, "shapes": 0.5},
                                                       "reward_options": {"shapes": {"batch_size": 4}}})
    assert cfg.reward == {"color": 1.0, "shapes": 0.5} and cfg.reward_options == {"shapes": {"batch_size": 4}}
    cfg = config_from_args(["--config", "configs/tiny_shapes_cpu.yaml", "--reward", "{color: 1.0, shapes: 0.5}",
                            "--reward_options", "{shapes: {batch_size: 4}}"])
    assert cfg.reward == {"color": 1.0, "shapes": 0.5} and cfg.reward_options == {"shapes": {"batch_size": 4}}
    assert config_from_args(["--config", "configs/tiny_shapes_cpu.yaml", "--reward", "shapes"]).reward == "shapes"


def test_config_reports_a_bad_mapping_with_every_other_problem():
    with pytest.raises(ConfigError) as info:
        config_from_args(["--config", "configs/tiny_shapes_cpu.yaml", "--reward", "{color: 1.0, shapez: 0}",
                          "--reward_options", "{model: DIR}", "--images_per_prompt", "1"])
    message = str(info.value)
    assert message.startswith("Invalid config:\n  ")
    for part in ("Unknown scorer 'shapez' (did you mean 'shapes'?)", "weight of reward 'shapez' is 0",
                 "reward_options key(s) 'model' are not scorers", "images_per_prompt (K) must be >= 2"):
        assert f"\n  {part}" in message, message
    with pytest.raises(ConfigError, match="reward must be a scorer name or a mapping of scorer names to weights, got 7"):
        config_from_args(["--config", "configs/tiny_shapes_cpu.yaml", "--reward", "7"])
    with pytest.raises(ConfigError, match="reward must be a scorer name or a mapping .* got \\['color'\\] \\(list\\)"):
        load_config("configs/tiny_shapes_cpu.yaml", {"reward": ["color"]})


# ------------------------------------------------------------------------------------------------ a user's own reward
CUSTOM = '''
import torch

from adrpo_diffusion.scorers import Scorer


def brightness(images, prompts, target=0.5):
    return -(images.mean(dim=(1, 2, 3)) - target).abs()


def one_number(images, prompts):
    return 1.0


class Redness(Scorer):
    def __init__(self, weight=1.0):
        self.weight = weight

    def _score_batch(self, images, prompts):
        return self.weight * images[:, 0].mean(dim=(1, 2))


not_a_function = 3
'''


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "my_rewards.py"


def test_a_custom_reward_by_file_or_module_scores_like_its_function(batch, custom_module):
    images, prompts = batch
    expected = -(images.mean(dim=(1, 2, 3)) - 0.7).abs()
    for name in (f"{custom_module}:brightness", "my_rewards:brightness"):
        assert torch.allclose(build_scorer(name, target=0.7).score(images, prompts), expected)
    reward = build_reward({"color": 1.0, "my_rewards:brightness": 2.0}, {"my_rewards:brightness": {"target": 0.7}})
    assert torch.allclose(reward.score(images, prompts), build_scorer("color").score(images, prompts) + 2 * expected)
    redness = build_scorer("my_rewards:Redness", weight=2.0).score(images, prompts)  # a Scorer subclass
    assert torch.allclose(redness, 2 * images[:, 0].mean(dim=(1, 2)))


@pytest.mark.parametrize("name, options, message", [
    ("my_rewards:brightness", {"targt": 1}, "Unknown option(s) ['targt'] for scorer 'my_rewards:brightness'; valid: "
                                            "['batch_size', 'device', 'target']"),
    ("my_rewards:nothing", {}, "Custom reward 'my_rewards:nothing': my_rewards has no 'nothing'"),
    ("my_rewards:not_a_function", {}, "is a int, not a function"),
    ("no_such_module:f", {}, "cannot import 'no_such_module'"),
    ("missing.py:f", {}, "no file missing.py"),
    ("my_rewards", {}, "Unknown scorer 'my_rewards'"),
])
def test_a_bad_custom_reward_is_named_before_anything_loads(custom_module, name, options, message):
    with pytest.raises(ValueError) as info:
        check_reward(name, options)
    assert message in str(info.value)


def test_a_custom_reward_that_returns_the_wrong_shape_says_so(batch, custom_module):
    with pytest.raises(ValueError, match=r"returned scores of shape \(\) for 8 images: it must return one number per"):
        build_scorer("my_rewards:one_number").score(*batch)


def test_a_custom_reward_trains_from_the_command_line(tmp_path, tiny_sd3_dir, custom_module):
    import json

    from adrpo_diffusion import cli

    out = tmp_path / "run"
    assert cli.train_main(["--config", "configs/tiny_cpu.yaml", "--reward", f"{custom_module}:brightness",
                           "--reward_options", "{target: 0.7}", "--reward_scale", "1", "--output_dir", str(out),
                           "--max_steps", "2", "--prompts_per_step", "2", "--images_per_prompt", "2",
                           "--eval_prompts", "0", "--sample_every", "0", "--checkpointing_steps", "0"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(-0.7 <= row["reward_mean"] <= 0 for row in rows)


def test_an_unreachable_reward_model_is_named_with_the_command_line_option_before_anything_loads(
        tmp_path, monkeypatch, capsys):
    import huggingface_hub
    import huggingface_hub.constants

    from adrpo_diffusion import cli, trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the reward model was found")

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(trainer, "load_family", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub, "file_exists", no_network)
    argv = ["--config", "configs/tiny_cpu.yaml", "--output_dir", str(tmp_path / "run")]

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert cli.train_main([*argv, "--reward", "clip"]) == 2
    err = capsys.readouterr().err
    assert "Cannot reach 'openai/clip-vit-large-patch14' on the hub (ConnectionError: Name or service not known)" in err
    assert ("`hf download openai/clip-vit-large-patch14 --local-dir /models/clip-vit-large-patch14`) and pass the "
            "directory: --reward_options '{model: /models/clip-vit-large-patch14}'") in err

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli.train_main([*argv, "--reward", "{color: 1, pickscore: 1}"]) == 2
    err = capsys.readouterr().err
    assert "reward 'pickscore': 'yuvalkirstain/PickScore_v1' is not a local directory and not in the hub cache" in err
    assert "--reward_options '{pickscore: {model: /models/PickScore_v1}}'" in err
    assert "--reward_options '{pickscore: {processor: /models/CLIP-ViT-H-14-laion2B-s32B-b79K}}'" in err
