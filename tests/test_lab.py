"""The method lab: the shapes grammar and generator, the pixel rewards on constructed images, the base
pre-training on a smoke scale, and one quick lab run producing the table and the plots."""

import json
import math

import pytest
import torch

from adrpo_diffusion.prompts import load_prompts
from adrpo_diffusion.scorers import build_scorer
from adrpo_diffusion.scorers.shapes import connected_components
from adrpo_diffusion.tasks.shapes import (
    SKILLS,
    CaptionError,
    Placed,
    all_captions,
    caption_of,
    draw_caption,
    parse_caption,
    render,
    sample_batch,
)


@pytest.fixture(scope="module")
def scorer():
    return build_scorer("shapes")


def checks(scorer, shapes, caption):
    """The reward and every check of one constructed image."""
    image = render(shapes)[None]
    values = {name: value.item() for name, value in scorer.checks(image, [caption]).items()}
    return scorer.score(image, [caption]).item(), values


# ---------------------------------------------------------------------------------------------------------------
# Grammar and generator


def test_grammar_round_trips_and_covers_the_four_skills():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 12 + 72 + 24 + 48
    assert {parse_caption(c).skill for c in captions} == set(SKILLS)
    for caption in captions:
        assert caption_of(parse_caption(caption)) == caption
    scene = parse_caption("three green squares")
    assert scene.skill == "count" and scene.objects[0].count == 3 and scene.objects[0].shape == "square"
    scene = parse_caption("a yellow triangle on the left")
    assert scene.skill == "position" and scene.objects[0].position == "left"
    assert [o.colour for o in parse_caption("a red circle and a blue square").objects] == ["red", "blue"]


@pytest.mark.parametrize("caption, message", [
    ("a purple circle", "unknown colour 'purple'"),
    ("a red apple", "unknown shape 'apple'"),
    ("two red circle", "plural"),
    ("a red circle and a red square", "two different colours"),
    ("two red circles on the left", "a position applies to a single shape"),
    ("a tall red tree", "expected"),
])
def test_captions_outside_the_grammar_are_rejected(caption, message):
    with pytest.raises(CaptionError, match=message):
        parse_caption(caption)


def test_generator_is_deterministic_and_draws_what_the_caption_says(scorer):
    images, captions = sample_batch(64, torch.Generator().manual_seed(3))
    again, captions_again = sample_batch(64, torch.Generator().manual_seed(3))
    other, _ = sample_batch(64, torch.Generator().manual_seed(4))
    assert captions == captions_again and torch.equal(images, again) and not torch.equal(images, other)
    assert images.shape == (64, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert {parse_caption(c).skill for c in captions} == set(SKILLS)
    rewards = scorer.score(images, captions)
    assert rewards.min() > 0.8 and rewards.mean() > 0.95  # the data itself scores high
    shuffled = scorer.score(images, captions[1:] + captions[:1])
    assert shuffled.mean() < 0.5  # and the wrong captions low


# ---------------------------------------------------------------------------------------------------------------
# Rewards from pixels, on constructed images


def test_colour(scorer):
    red, checks_red = checks(scorer, [Placed("circle", "red", 16, 16, 12)], "a red circle")
    blue, checks_blue = checks(scorer, [Placed("circle", "blue", 16, 16, 12)], "a red circle")
    assert checks_red["colour"] > 0.95 and checks_blue["colour"] < 1e-3
    assert red > 0.9 and blue < 0.4
    assert math.isnan(checks_red["position"])  # no position in the caption: not a check
    # a second shape of another colour lowers the precision
    _, extra = checks(scorer, [Placed("circle", "red", 8, 8, 10), Placed("square", "green", 24, 24, 10)], "a red circle")
    assert 0.3 < extra["colour"] < 0.8


def test_shape(scorer):
    for shape in ("circle", "square", "triangle"):
        for drawn in ("circle", "square", "triangle"):
            _, values = checks(scorer, [Placed(drawn, "green", 15.3, 16.7, 11)], f"a green {shape}")
            assert (values["shape"] > 0.8) if drawn == shape else (values["shape"] < 0.2), (shape, drawn, values)


def test_count(scorer):
    squares = [Placed("square", "green", x, y, 7) for x, y in ((6, 6), (24, 8), (12, 24))]
    _, three = checks(scorer, squares, "three green squares")
    _, two = checks(scorer, squares[:2], "three green squares")
    assert three["count"] == 1.0 and two["count"] == pytest.approx(math.exp(-1))
    assert two["shape"] == pytest.approx(2 / 3 * three["shape"], rel=1e-3)  # the missing square scores 0


def test_position(scorer):
    caption = "a yellow triangle on the left"
    scores = {x: checks(scorer, [Placed("triangle", "yellow", x, 16, 8)], caption)[1]["position"] for x in (6, 16, 26)}
    assert scores[6] == 1.0 and scores[16] == pytest.approx(0.5, abs=0.05) and scores[26] == 0.0
    _, top = checks(scorer, [Placed("square", "red", 16, 5, 8)], "a red square at the top")
    _, bottom = checks(scorer, [Placed("square", "red", 16, 5, 8)], "a red square at the bottom")
    assert top["position"] == 1.0 and bottom["position"] == 0.0


def test_binding(scorer):
    caption = "a red circle and a blue square"
    right, good = checks(scorer, [Placed("circle", "red", 8, 16, 10), Placed("square", "blue", 24, 16, 10)], caption)
    swapped, bad = checks(scorer, [Placed("square", "red", 8, 16, 10), Placed("circle", "blue", 24, 16, 10)], caption)
    assert good["colour"] == pytest.approx(bad["colour"])  # both colours are there either way
    assert good["shape"] > 0.9 and bad["shape"] < 0.1 and right > swapped + 0.25


def test_geneval_pass_needs_every_check(scorer):
    """geneval_pass: 1 only when every check that applies exceeds 0.5 (an exact count, the right shape, the named
    half of the image); the data itself passes almost always."""
    squares = [Placed("square", "green", x, y, 7) for x, y in ((6, 6), (24, 8), (12, 24))]
    cases = [
        (squares, "three green squares", 1.0),
        (squares[:2], "three green squares", 0.0),  # count exp(-1) < 0.5
        ([Placed("circle", "green", 16, 16, 11)], "a green triangle", 0.0),  # wrong shape
        ([Placed("triangle", "yellow", 6, 16, 8)], "a yellow triangle on the left", 1.0),
        ([Placed("triangle", "yellow", 26, 16, 8)], "a yellow triangle on the left", 0.0),  # wrong side
        ([Placed("circle", "red", 8, 16, 10), Placed("square", "blue", 24, 16, 10)], "a red circle and a blue square", 1.0),
        ([Placed("square", "red", 8, 16, 10), Placed("circle", "blue", 24, 16, 10)], "a red circle and a blue square", 0.0),
    ]
    images = torch.stack([render(shapes) for shapes, _, _ in cases])
    details = scorer.details(images, [caption for _, caption, _ in cases])
    assert details["geneval_pass"].tolist() == [expected for _, _, expected in cases]
    assert set(details) == {"colour", "shape", "count", "position", "geneval_pass"}
    data, captions = sample_batch(64, torch.Generator().manual_seed(5))
    assert scorer.details(data, captions)["geneval_pass"].mean() > 0.9


def test_components_and_prompt_checks(scorer):
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 1:3, 1:3] = mask[0, 5:7, 4:8] = True
    mask[0, 3, 3] = True  # touches the first block diagonally: 8-connected
    labels = connected_components(mask)
    assert len(labels.unique()) == 3 and labels[0, 3, 3] == labels[0, 1, 1]
    scorer.check_prompts(load_prompts("prompts/shapes.txt"))
    with pytest.raises(ValueError, match="shapes grammar only.*unknown shape 'dog'"):
        scorer.check_prompts(["a red circle", "a red dog"])
    images = torch.stack([draw_caption(c, torch.Generator().manual_seed(0)) for c in ("a red circle", "a blue square")])
    rewards = scorer.score(1 - images, ["a red circle", "a blue square"])  # inverted colours
    assert ((0 <= rewards) & (rewards <= 1)).all()


# ---------------------------------------------------------------------------------------------------------------
# The base: pre-training on a smoke scale, and the cached model


@pytest.mark.slow
def test_pretraining_smoke_scale_learns_and_is_deterministic():
    from adrpo_diffusion.testing.shapes_base import build_untrained_pipeline, pretrain_transformer

    def run():
        pipe = build_untrained_pipeline(seed=0, vae_steps=3)
        losses = pretrain_transformer(pipe, steps=40, batch_size=16, bank_size=64, learning_rate=2e-3)
        return losses, pipe.transformer.state_dict()

    losses, weights = run()
    again, weights_again = run()
    assert losses == again and all(torch.equal(weights[k], weights_again[k]) for k in weights)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])


def test_builtin_shapes_base_is_a_known_model():
    from adrpo_diffusion.families import check_model_source

    check_model_source("builtin:tiny-sd3-shapes")
    with pytest.raises(ValueError, match="builtin:tiny-sd3, builtin:tiny-sd3-shapes"):
        check_model_source("builtin:tiny-sd3-circles")


# ---------------------------------------------------------------------------------------------------------------
# One quick lab run


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory, shapes_test_base):
    from adrpo_diffusion.lab.experiment import main

    out = tmp_path_factory.mktemp("quick-lab") / "lab"
    assert main(["--quick", "--pretrained_model", shapes_test_base, "--output_dir", str(out)]) == 0
    return out


QUICK_RUNS = ["adrpo beta0=0.5", "adrpo beta0=1", "raft top_k=1", "raft top_k=2", "nft kl_beta=0.0001",
              "nft kl_beta=0.1"]


@pytest.mark.slow
def test_quick_lab_writes_the_table_the_plots_and_the_grids(quick_lab):
    from adrpo_diffusion.lab.experiment import chosen_index, matched_reward

    results = json.loads((quick_lab / "results.json").read_text())
    assert list(results["runs"]) == QUICK_RUNS
    base = results["base"]
    assert 0.2 < base["reward"] < 0.9 and base["pixel_diversity"] > 0.05  # imperfect and diverse
    assert 0 <= base["geneval_pass"] <= 1
    for name, run in results["runs"].items():
        records = run["seeds"]["0"]
        assert [r["step"] for r in records] == [0, 1, 2]
        assert records[0] == {"step": 0, **base}
        assert all(0 <= r["reward"] <= 1 and 0 <= r["geneval_pass"] <= 1 for r in records)
        assert records[-1]["w2_divergence"] > 0, name  # the policy moved away from the base
        # the learning rate is the one whose chosen checkpoint scored best on the validation seeds
        assert set(run["lr_sweep"]) == {"0.003", "0.03"}
        assert run["lr_sweep"][f"{run['learning_rate']:g}"] == max(run["lr_sweep"].values())
        assert records[chosen_index(records)]["validation_reward"] == run["lr_sweep"][f"{run['learning_rate']:g}"]
        assert set(run["lr_sweep_records"]) == {"0.003", "0.03"}  # every rate's records, the chosen rate's as above
        assert run["lr_sweep_records"][f"{run['learning_rate']:g}"] == records
    assert results["runs"]["nft kl_beta=0.1"]["overrides"] == {"method": "nft", "method_options": {"kl_beta": 0.1}}
    table = (quick_lab / "lab_table.md").read_text()
    assert all(f"| {name} |" in table for name in QUICK_RUNS) and "Reward at matched diversity" in table
    for method in ("adrpo", "raft", "nft"):
        assert f"| {method} | {method} " in table  # each method's row in the matched-diversity table
    sweep = table.split("Learning-rate sweep")[1]
    target = results["settings"]["matched_diversity"] * base["feature_diversity"]
    for name in QUICK_RUNS:  # one row per rate, the run's own rate marked, its last cell the gain at matched diversity
        chosen = f"| {name} | {results['runs'][name]['learning_rate']:g} (chosen) |"
        assert sweep.count(f"| {name} | ") == 2 and sweep.count(chosen) == 1
        row = next(line for line in sweep.splitlines() if line.startswith(chosen))
        matched = matched_reward(results["runs"][name]["seeds"]["0"], target)[0] - base["reward"]
        assert row.split("|")[-2].strip() == f"{matched:+.4f}"
    for plot in ("frontier.png", "learning_curves.png"):
        assert (quick_lab / plot).stat().st_size > 10_000
    for grid in ("samples_base.png", "samples_data.png", "samples_comparison.png"):
        assert (quick_lab / grid).stat().st_size > 1000


def test_matched_reward_interpolates_where_the_diversity_crosses_the_target():
    from adrpo_diffusion.lab.experiment import chosen_index, matched_reward

    records = [{"step": 0, "feature_diversity": 1.0, "reward": 0.5, "reward_gain_se": 0.0, "validation_reward": 0.4},
               {"step": 10, "feature_diversity": 0.95, "reward": 0.6, "reward_gain_se": 0.01, "validation_reward": 0.7},
               {"step": 20, "feature_diversity": 0.8, "reward": 0.8, "reward_gain_se": 0.02, "validation_reward": 0.6}]
    reward, se, step = matched_reward(records, 0.9)  # a third of the way from step 10 to step 20
    assert reward == pytest.approx(0.6 + 0.2 / 3) and se == pytest.approx(0.01 + 0.01 / 3) and step == 20
    assert matched_reward(records, 0.5) == (0.8, 0.02, 20)  # never below the target: its best point
    assert math.isnan(matched_reward(records, 1.01)[0])  # even the base is below the target
    assert chosen_index(records) == 1  # the best validation reward, not the last step
    records[0]["validation_reward"] = 0.9
    assert chosen_index(records) == 0  # the base itself when training never beat it on validation


@pytest.mark.slow
def test_a_killed_lab_resumes_to_the_same_results(shapes_test_base, tmp_path, monkeypatch):
    """One run of the quick lab (both learning rates), killed after its second step trained and checkpointed but
    before that step's record was written: --resume measures that checkpoint instead of training again, and every
    number matches the same lab run without the kill."""
    from adrpo_diffusion.lab import experiment

    measure, calls = experiment.HeldoutProbe.measure, []

    def killed_on_the_second_call(self, trainer):
        calls.append(trainer.step)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(self, trainer)

    out = tmp_path / "lab"
    monkeypatch.setattr(experiment.HeldoutProbe, "measure", killed_on_the_second_call)
    quick = ["--quick", "--pretrained_model", shapes_test_base, "--output_dir", str(out), "--runs", QUICK_RUNS[0]]
    with pytest.raises(KeyboardInterrupt):
        experiment.main(quick)
    assert calls == [1, 2] and not (out / "results.json").exists()
    monkeypatch.setattr(experiment.HeldoutProbe, "measure", measure)
    with pytest.raises(ValueError, match="other settings"):
        experiment.main(quick + ["--resume", "--sampler_steps", "3"])
    assert experiment.main(quick + ["--resume"]) == 0
    quick[quick.index("--output_dir") + 1] = str(tmp_path / "uninterrupted")
    assert experiment.main(quick) == 0
    resumed, uninterrupted = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("lab", "uninterrupted"))
    assert resumed["base"] == uninterrupted["base"] and resumed["runs"] == uninterrupted["runs"]


def test_lab_refuses_to_overwrite_a_directory_it_did_not_write(tmp_path):
    from adrpo_diffusion.lab.experiment import main, prepare_output_dir

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a method-lab output"):
        main(["--quick", "--output_dir", str(other)])
    assert (other / "notes.txt").read_text() == "keep me"
    previous = tmp_path / "lab"
    (previous / "runs" / "adrpo").mkdir(parents=True)
    (previous / "results.json").write_text("{}")
    assert prepare_output_dir(str(previous)) == previous
    assert not (previous / "runs").exists()  # a new lab never resumes an old lab's checkpoints
    with pytest.raises(SystemExit):
        main(["--steps", "5", "--eval_every", "2", "--output_dir", str(tmp_path / "new")])


def test_the_shapes_config_uses_the_labs_protocol():
    from adrpo_diffusion.config import load_config
    from adrpo_diffusion.lab.experiment import LabSettings, lab_runs

    config = load_config("configs/tiny_shapes_cpu.yaml", {})
    lab = LabSettings().training()
    # not shared: the recipe's loss times per image (6 against the lab's 4) and its steps, rate schedule and merged
    # rollouts and anchor, chosen for five minutes of training (docs/method_lab.md, "The recipe")
    shared = ("pretrained_model", "prompt_file", "reward", "reward_scale", "prompts_per_step", "images_per_prompt",
              "num_inference_steps", "guidance_scale", "resolution", "max_sequence_length", "time_sampling",
              "lora_rank", "lora_alpha", "max_grad_norm")
    assert {k: getattr(config, k) for k in shared} == {k: lab[k] for k in shared}
    overrides = [run.overrides for run in lab_runs(LabSettings())]
    assert {"method": config.method, "method_options": config.method_options} in overrides


def test_runs_selects_runs_by_name_and_rejects_unknown_ones(capsys):
    from adrpo_diffusion.lab.experiment import FRONTIER, LabSettings, lab_runs, main

    everything = lab_runs(LabSettings())
    assert len(everything) == 3 * len(FRONTIER) == 24
    picked = lab_runs(LabSettings(runs=["raft top_k=2", "adrpo-ema beta0=2"]))
    assert [(run.name, run.method, run.strength) for run in picked] == [("adrpo-ema beta0=2", "adrpo-ema", 2.0),
                                                                        ("raft top_k=2", "raft", 2)]
    assert picked[0].overrides == {"method": "adrpo", "method_options": {
        "beta0": 2.0, "advantage_min": -2.0, "advantage_max": 2.0, "advantage_normalization": "group_std",
        "anchor": "ema", "base_divergence": False}}
    assert [run.name for run in lab_runs(LabSettings(methods=["dpo"], strengths=2))] == ["dpo beta=500", "dpo beta=2500"]
    with pytest.raises(SystemExit):  # a base that is not there: named before anything loads
        main(["--pretrained_model", "/no/such/base"])
    assert "/no/such/base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--runs", "raft top_k=3"])
    assert "unknown run(s) ['raft top_k=3']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--methods", "ppo"])
    assert "unknown method(s) ['ppo']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # validation on the held-out images would choose on what it reports
        main(["--val_seed", "10000"])
    assert "val_seed must differ from eval_seed (10000)" in capsys.readouterr().err


def test_learning_rate_sweeps_read_numbers_and_scale_each_methods_rate(capsys):
    from adrpo_diffusion.lab.experiment import LEARNING_RATES, LabSettings, main, run_rates

    assert LEARNING_RATES["adrpo"] == 1e-2 and LEARNING_RATES["nft"] == 3e-3
    factors = LabSettings(learning_rate_factors=[0.3, 1, 3])
    assert run_rates(factors, "adrpo") == [0.003, 0.01, 0.03]  # exact decimals, not 0.0030000000000000005
    assert run_rates(factors, "nft") == [0.0009, 0.003, 0.009]
    assert run_rates(LabSettings(learning_rates=[1e-3]), "nft") == [1e-3]
    assert run_rates(LabSettings(), "raft") == [LEARNING_RATES["raft"]]
    for argv, message in [
        (["--learning_rate_factors", "0", "1"], "learning_rate_factors must be a list of positive numbers, got [0, 1]"),
        (["--learning_rates", "fast"], "learning_rates must be a list of positive numbers, got ['fast']"),
        (["--learning_rates", "3e-3", "--learning_rate_factors", "2"],  # YAML reads 3e-3 as text: still a rate
         "give learning_rates or learning_rate_factors, not both"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_lab_settings_come_from_the_config_engine(tmp_path, capsys, monkeypatch):
    """adrpo-lab reads a YAML file with --key value on top, like every command, and names every problem at once."""
    from adrpo_diffusion.lab import experiment

    seen = {}
    monkeypatch.setattr(experiment, "run_lab", lambda settings, resume: seen.update(settings=settings) or {"seconds": 0})
    monkeypatch.setattr(experiment, "check_model_source", lambda name: None)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "lab_table.md").write_text("table")
    config = tmp_path / "lab.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nsteps: 40\nseeds: [0, 1]\nmatched_diversity: 1\n")
    assert experiment.main(["--config", str(config), "--steps", "80", "--methods", "raft", "dpo",
                            "--learning_rates", "3e-3", "1e-2"]) == 0
    got = seen["settings"]
    assert (got.steps, got.seeds, got.methods, got.matched_diversity) == (80, [0, 1], ["raft", "dpo"], 1.0)
    assert got.learning_rates == [0.003, 0.01]  # YAML's text '3e-3' read as the number
    assert isinstance(got.matched_diversity, float) and got.eval_every == 20  # the rest: the defaults
    assert experiment.main(["--quick", "--config", str(config)]) == 0  # --quick under the file and the command line
    assert (seen["settings"].steps, seen["settings"].sampler_steps) == (40, experiment.QUICK["sampler_steps"])
    config.write_text("step: 40\nseeds: zero\n")
    with pytest.raises(SystemExit):
        experiment.main(["--config", str(config)])
    err = capsys.readouterr().err
    assert "'step' (did you mean 'steps'?)" in err and "seeds must be list, got 'zero' (str)" in err
    with pytest.raises(SystemExit):
        experiment.main(["--eval_evry", "10"])
    assert "'eval_evry' (did you mean 'eval_every'?)" in capsys.readouterr().err
