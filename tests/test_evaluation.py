"""The Table 1 evaluator: statistics, table rendering, config errors, LoRA fit checks, and the CLI end to end on the
tiny SD3 pipeline with tiny random scorers (generation, scoring, resume, undecodable images, a folder of images)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from adrpo_diffusion.checkpoint import LORA_WEIGHTS_NAME
from adrpo_diffusion.evaluation import generate
from adrpo_diffusion.evaluation.aggregate import mean_and_se, summarize
from adrpo_diffusion.evaluation.cli import evaluate_main
from adrpo_diffusion.evaluation.config import EvalConfigError, load_eval_config
from adrpo_diffusion.evaluation.generate import LoraMismatchError, file_sha1, load_lora_checked
from adrpo_diffusion.evaluation.score import _cache_key
from adrpo_diffusion.evaluation.tables import marks, render_csv, render_latex, render_markdown
from adrpo_diffusion.families import add_lora
from adrpo_diffusion.families.sd3 import SD3Family

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "eval_tiny_cpu.yaml"
METRICS = ["clipscore", "clipdiversity", "aesthetic", "blipscore", "imagereward", "pickscore"]
# 3 prompts in 2 categories, K = 2 images each, 2 seeds, 2 models: 24 images.
PROMPTS_CSV = "prompt,category\nA red colored car.,Colors\nA blue bird.,Colors\nThree cats on a mat.,Counting\n"


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def test_standard_error_is_sample_std_of_seed_means_over_sqrt_n():
    values = np.random.default_rng(0).normal(size=5)
    mean, se = mean_and_se(values)
    assert mean == pytest.approx(values.mean())
    assert se == pytest.approx(np.std(values, ddof=1) / np.sqrt(5))
    assert mean_and_se([2.5]) == (2.5, None)  # one seed: not available, not 0


def test_summary_averages_prompts_within_each_seed_then_over_seeds():
    # groups are (model, seed, prompt set, prompt index); seed 1 lacks a prompt (e.g. its images were unreadable)
    values = {("m", 0, "a", 0): 1.0, ("m", 0, "a", 1): 3.0, ("m", 0, "b", 0): 8.0,
              ("m", 1, "a", 0): 2.0, ("m", 1, "b", 0): 6.0}
    summary = summarize(values)
    assert summary["per_seed"] == {0: 4.0, 1: 4.0}
    assert summary["mean"] == 4.0 and summary["se"] == 0.0 and summary["n_seeds"] == 2 and summary["n_prompts"] == 3
    only_a = summarize(values, lambda g: g[2] == "a")
    assert only_a["per_seed"] == {0: 2.0, 1: 2.0}
    assert summarize(values, lambda g: g[2] == "c") is None


# ---------------------------------------------------------------------------------------------------------------
# Tables


def stat(mean):
    return {"mean": mean, "se": 0.1}


def test_marks_rank_distinct_printed_values_higher_is_better():
    assert marks([stat(1.0), stat(3.0), stat(2.0), None], 2) == ["", "best", "second", ""]
    assert marks([stat(3.0), stat(3.0), stat(2.0), stat(1.0)], 2) == ["best", "best", "second", ""]
    # equal as printed (2 decimals): tied; the next distinct value is second
    assert marks([stat(3.001), stat(3.004), stat(2.5)], 2) == ["best", "best", "second"]
    assert marks([stat(-1.0), stat(-1.0)], 2) == ["best", "best"]  # all tied: all best, no second
    assert marks([stat(-2.0), stat(-1.0)], 2) == ["second", "best"]


def test_renderers_bold_best_underline_second_and_format_se():
    rows = [
        ("base_model", {"clipscore": {"mean": 31.234, "se": 0.0512, "n_seeds": 3},
                        "pickscore": {"mean": 21.0, "se": None, "n_seeds": 1}}),
        ("ours", {"clipscore": {"mean": 32.5, "se": 0.1, "n_seeds": 3}, "pickscore": None}),
        ("other", {"clipscore": {"mean": 30.0, "se": 0.2, "n_seeds": 3},
                   "pickscore": {"mean": 20.0, "se": 0.3, "n_seeds": 3}}),
    ]
    metrics = ["clipscore", "pickscore"]
    markdown = render_markdown(rows, metrics)
    assert "| Model | ClipScore ↑ | PickScore ↑ |" in markdown
    assert "| base_model | <u>31.23 ± 0.05</u> | **21.00 ± n/a** |" in markdown
    assert "| ours | **32.50 ± 0.10** | – |" in markdown
    assert "| other | 30.00 ± 0.20 | <u>20.00 ± 0.30</u> |" in markdown

    latex = render_latex(rows, metrics)
    assert r"base\_model & \underline{31.23 $\pm$ 0.05} & \textbf{21.00 $\pm$ n/a} \\" in latex
    assert r"ours & \textbf{32.50 $\pm$ 0.10} & – \\" in latex
    assert latex.startswith(r"\begin{tabular}{lcc}") and r"\bottomrule" in latex

    lines = render_csv(rows, metrics).splitlines()
    assert lines[0] == "model,clipscore_mean,clipscore_se,clipscore_n_seeds,pickscore_mean,pickscore_se,pickscore_n_seeds"
    assert lines[1] == "base_model,31.234,0.0512,3,21.0,,1"
    assert lines[2] == "ours,32.5,0.1,3,,,"


# ---------------------------------------------------------------------------------------------------------------
# Config errors, before any model loads


@pytest.fixture()
def prompts_csv(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text(PROMPTS_CSV)
    return path


def _config(prompts_csv, **overrides) -> dict:
    values = {"models": [{"name": "tiny", "base": "builtin:tiny-sd3"}],
              "prompt_sets": [{"name": "mini", "file": str(prompts_csv)}], "output_dir": str(prompts_csv.parent)}
    return {**values, **overrides}


def test_unknown_metric_and_unknown_keys_name_the_valid_ones(prompts_csv):
    with pytest.raises(EvalConfigError, match=r"Unknown metric 'clipscor'; valid: clipscore, clipdiversity"):
        load_eval_config(overrides=_config(prompts_csv, metrics=["clipscor"]))
    with pytest.raises(EvalConfigError, match=r"'image_per_prompt' \(did you mean 'images_per_prompt'\?\)"):
        load_eval_config(overrides=_config(prompts_csv, image_per_prompt=2))
    models = [{"name": "tiny", "base": "builtin:tiny-sd3", "steps": 4}]
    with pytest.raises(EvalConfigError, match=r"models\[0\]: 'steps'.*Valid keys: name, base, lora"):
        load_eval_config(overrides=_config(prompts_csv, models=models))
    with pytest.raises(EvalConfigError, match=r"metric_options.pickscore: Unknown option\(s\) \['modle'\]"):
        load_eval_config(overrides=_config(prompts_csv, metric_options={"pickscore": {"modle": "x"}}))
    with pytest.raises(EvalConfigError, match=r"images_per_prompt must be >= 2"):
        load_eval_config(overrides=_config(prompts_csv, images_per_prompt=1))


def test_heldout_fraction_evaluates_only_prompts_a_run_with_it_never_trained_on(tmp_path):
    from adrpo_diffusion.evaluation.config import load_prompt_set
    from adrpo_diffusion.prompts import training_prompts

    files = ["prompts/drawbench.csv", "prompts/styles.txt", "prompts/compositional.txt"]
    prompt_sets = [{"name": Path(f).stem, "file": f} for f in files]
    cfg = load_eval_config(overrides=_config(tmp_path / "p.csv", prompt_sets=prompt_sets, heldout_fraction=0.25))
    evaluated = [e for s in cfg.prompt_sets for e in load_prompt_set(s, heldout_fraction=cfg.heldout_fraction)]
    trained = training_prompts(files, 0.25)
    assert len(evaluated) + len(trained) == 330 and not {e.prompt for e in evaluated} & set(trained)
    drawbench = [e for e in evaluated if e.prompt_set == "drawbench"]
    assert len({e.category for e in drawbench}) == 11  # every DrawBench category keeps held-out prompts
    assert drawbench[0].index == 10 and drawbench[0].prompt == "A black colored sandwich."  # its row in the file
    # max_prompts_per_set: evenly spaced through the held-out prompts
    assert load_prompt_set(cfg.prompt_sets[0], 4, 0.25) == [drawbench[i * len(drawbench) // 4] for i in range(4)]
    with pytest.raises(EvalConfigError, match=r"heldout_fraction must be in \[0, 1\)"):
        load_eval_config(overrides=_config(tmp_path / "p.csv", prompt_sets=prompt_sets, heldout_fraction=1.0))


def test_table1_config_compares_every_method_trained_as_documented_with_its_training_sampler():
    """configs/eval_table1.yaml against configs/sd3_medium_80gb.yaml (both read, not validated: no hub offline)."""
    from adrpo_diffusion.config import load_config
    from adrpo_diffusion.methods import available_methods

    table = yaml.safe_load((REPO / "configs" / "eval_table1.yaml").read_text())
    train = load_config(REPO / "configs" / "sd3_medium_80gb.yaml")
    sd3 = [m for m in table["models"] if m["base"] == train.pretrained_model]
    assert sorted(m.get("lora") for m in sd3 if m.get("lora")) == sorted(
        f"outputs/sd3-medium-{method}-80gb" for method in available_methods())  # the documented loop's dirs
    assert train.output_dir == "outputs/sd3-medium-adrpo-80gb" and train.method == "adrpo"
    for model in sd3:
        assert (model["resolution"], model["num_inference_steps"], model["guidance_scale"]) == (
            train.resolution, train.num_inference_steps, train.guidance_scale), model["name"]
    others = {m["name"]: m["base"] for m in table["models"] if m not in sd3}
    assert others == {"FLUX.1-dev": "black-forest-labs/FLUX.1-dev",
                      "SANA-1.5-4.8B": "Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers"}
    assert table["heldout_fraction"] == train.heldout_fraction > 0
    assert sorted(s["file"] for s in table["prompt_sets"]) == sorted(train.prompt_file)
    assert table["metrics"] == METRICS and table["metric_options"]["clipdiversity"] == {"distance": "l2",
                                                                                        "normalize": False}


def test_empty_prompt_set_and_missing_lora_are_reported_together(prompts_csv, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n")
    models = [{"name": "tuned", "base": "builtin:tiny-sd3", "lora": str(tmp_path / "no-lora")}]
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(_config(prompts_csv, models=models,
                                             prompt_sets=[{"name": "empty", "file": str(empty)}])))
    assert evaluate_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"prompt set 'empty': {empty} contains no prompts" in err
    assert f"LoRA directory {tmp_path / 'no-lora'} has no {LORA_WEIGHTS_NAME}" in err
    assert "adrpo-train --config configs/tiny_cpu.yaml" in err
    assert not (tmp_path / "images").exists()  # failed before generating anything
    with pytest.raises(EvalConfigError, match="prompt_sets is empty"):
        load_eval_config(overrides=_config(prompts_csv, prompt_sets=[]))


# ---------------------------------------------------------------------------------------------------------------
# LoRA fit


def _export_random_lora(transformer, directory) -> Path:
    """A LoRA with random (non-zero) A and B at scale alpha / r = 8, so its effect on the images is clearly visible
    (about 22 of 255 levels on average on the tiny SD3; at scale 1 it is about 2, and version-dependent)."""
    torch.manual_seed(0)
    SD3Family.export_lora(transformer, add_lora(transformer, 4, 32.0, SD3Family.lora_targets, init_weights=False), directory)
    return Path(directory)


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd3_dir, tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    return _export_random_lora(SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer"),
                               tmp_path_factory.mktemp("lora"))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # several adapters tried on one pipeline
def test_mismatched_lora_is_an_error(tiny_pipe, tiny_lora, tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file, save_file

    # another architecture (attention width 48 instead of 32): the weights cannot load
    wider = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=24, num_attention_heads=2, joint_attention_dim=64,
                                  caption_projection_dim=48, pooled_projection_dim=64, pos_embed_max_size=32)
    with pytest.raises(LoraMismatchError, match=r"(?s)does not fit builtin:tiny-sd3.*size mismatch"):
        load_lora_checked(tiny_pipe, str(_export_random_lora(wider, tmp_path / "wider")), "builtin:tiny-sd3")

    # keys naming layers the model lacks: diffusers only warns and loads the rest (or nothing)
    state = load_file(str(tiny_lora / LORA_WEIGHTS_NAME))
    for name, rename in (("missing-block", lambda k: k.replace("blocks.1.", "blocks.7.")),
                         ("other-prefix", lambda k: k.replace("transformer.", "unet.", 1))):
        (tmp_path / name).mkdir()
        save_file({rename(k): v for k, v in state.items()}, str(tmp_path / name / LORA_WEIGHTS_NAME))
        with pytest.raises(LoraMismatchError, match=r"has 15 LoRA layers but only \d+ matched"):
            load_lora_checked(tiny_pipe, str(tmp_path / name), "builtin:tiny-sd3", adapter_name=name.replace("-", "_"))


# ---------------------------------------------------------------------------------------------------------------
# The CLI end to end


def _overrides(output_dir, prompts_csv, lora, **extra) -> dict:
    sampling = {"num_inference_steps": 4, "guidance_scale": 1.0, "call_kwargs": {"max_sequence_length": 8}}
    models = [{"name": "tiny", "base": "builtin:tiny-sd3", **sampling},
              {"name": "tiny+lora", "base": "builtin:tiny-sd3", "lora": str(lora), **sampling}]
    return {"output_dir": str(output_dir), "models": models, "prompt_sets": [{"name": "mini", "file": str(prompts_csv)}],
            "images_per_prompt": 2, "seeds": [0, 1], "batch_size": 8, **extra}


def _argv(output_dir, prompts_csv, lora, **extra) -> list[str]:
    argv = ["--config", str(TINY_CONFIG)]
    for key, value in _overrides(output_dir, prompts_csv, lora, **extra).items():
        argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return argv


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_lora):
    """One complete evaluation (all six metrics), shared read-only; tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("eval")
    prompts_csv = root / "prompts.csv"
    prompts_csv.write_text(PROMPTS_CSV)
    assert evaluate_main(_argv(root / "out", prompts_csv, tiny_lora)) == 0
    return root / "out", prompts_csv


def _results(output_dir) -> dict:
    return json.loads((Path(output_dir) / "results.json").read_text())


def test_cli_writes_every_output(evaluated):
    out, _ = evaluated
    for name in ("table1.md", "table1.csv", "table1.tex", "results.json", "reward_vs_diversity.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "reward_vs_diversity.png").size[0] > 100
    results = _results(out)
    assert list(results["models"]) == ["tiny", "tiny+lora"] and results["failed_images"] == []
    for model in ("tiny", "tiny+lora"):
        entry = results["models"][model]
        assert entry["images"] == 12 and entry["failed_images"] == 0
        for metric in METRICS:
            summary = entry["metrics"][metric]
            per_seed = list(summary["per_seed"].values())
            assert summary["n_seeds"] == 2 and summary["n_prompts"] == 3
            assert summary["mean"] == pytest.approx(np.mean(per_seed))
            assert summary["se"] == pytest.approx(np.std(per_seed, ddof=1) / np.sqrt(2))
            assert set(summary["per_category"]) == {"mini/Colors", "mini/Counting"}
            assert summary["per_prompt"]["mini/2"]["prompt"] == "Three cats on a mat."
    markdown = (out / "table1.md").read_text()
    assert "| tiny+lora |" in markdown and "## Category: mini/Counting" in markdown
    assert (out / "table1.csv").read_text().startswith("model,clipscore_mean,clipscore_se,clipscore_n_seeds,")

    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 24 and (out / "images" / "tiny+lora" / "1" / "mini" / "0002_1.png") in images
    record = json.loads((out / "images" / "tiny+lora" / "1" / "mini" / "0002_1.json").read_text())
    assert record["prompt"] == "Three cats on a mat." and record["category"] == "Counting" and record["k"] == 1
    assert record["settings"]["lora_sha1"] and record["settings"]["num_inference_steps"] == 4


def test_lora_rows_are_the_lora_pipelines_images(evaluated, tiny_lora):
    """The LoRA row shows what ``load_lora_weights`` on a fresh pipeline draws for the same seed, not the base's image.
    (Compared with images regenerated here, not with a fixed pixel distance: how far a random LoRA moves the tiny
    model's pixels depends on package versions.)"""
    out, prompts_csv = evaluated
    cfg = load_eval_config(TINY_CONFIG, _overrides(out, prompts_csv, tiny_lora))
    name = "0/mini/0000_0.png"
    record = generate.ImageRecord(name, "", "mini", 0, "A red colored car.", "Colors", 0, 0)
    for model in cfg.models:
        family = generate.load_model(model, torch.float32, "cpu")
        fresh = np.asarray(generate.run_pipeline(family, model, cfg.resolution, [record])[0], dtype=float)
        saved = np.asarray(Image.open(out / "images" / model.name / name), dtype=float)
        np.testing.assert_allclose(saved, fresh, atol=1.0)  # PNG round trip; same seed, same pipeline
        if model.lora is None:
            base = saved
    assert np.abs(saved - base).mean() > 5.0  # the LoRA changes the image far beyond the PNG round trip


def test_rerun_regenerates_and_rescores_only_what_is_missing(evaluated, tmp_path, tiny_lora, monkeypatch):
    from adrpo_diffusion.scorers.base import Scorer
    from adrpo_diffusion.scorers.clip import ClipScorer

    source, prompts_csv = evaluated
    out = tmp_path / "out"
    shutil.copytree(source, out)  # copy2 keeps the modification times
    deleted = [out / "images" / "tiny" / "1" / "mini" / "0001_0.png", out / "images" / "tiny+lora" / "0" / "mini" / "0002_1.png"]
    for path in deleted:
        path.unlink()
    (out / "scores" / "pickscore.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}

    generated, scored = [], {}
    run_pipeline = generate.run_pipeline
    monkeypatch.setattr(generate, "run_pipeline",
                        lambda pipe, model, resolution, batch: generated.extend(r.path for r in batch)
                        or run_pipeline(pipe, model, resolution, batch))
    score, embed = Scorer.score, ClipScorer.image_embeddings

    def counting_score(self, images, prompts):
        scored[type(self).__name__] = scored.get(type(self).__name__, 0) + len(prompts)
        return score(self, images, prompts)

    def counting_embeddings(self, images):
        scored["embeddings"] = scored.get("embeddings", 0) + len(images)
        return embed(self, images)

    monkeypatch.setattr(Scorer, "score", counting_score)
    monkeypatch.setattr(ClipScorer, "image_embeddings", counting_embeddings)
    assert evaluate_main(_argv(out, prompts_csv, tiny_lora)) == 0

    assert sorted(generated) == sorted(str(p.relative_to(out / "images")) for p in deleted)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())  # the other images were not rewritten
    assert all(p.is_file() for p in deleted)
    assert scored["PickScoreScorer"] == 24  # its cache was deleted: everything rescored
    # the others: at most the two regenerated images (none when they came back bit-identical)
    assert all(count <= 2 for name, count in scored.items() if name != "PickScoreScorer")
    assert scored.get("embeddings", 0) <= 2 * 2  # ClipDiversity: the two groups of the regenerated images
    before, after = _results(source), _results(out)
    for metric in METRICS:
        assert after["models"]["tiny"]["metrics"][metric]["mean"] == pytest.approx(
            before["models"]["tiny"]["metrics"][metric]["mean"], rel=1e-4, abs=1e-6)


def test_each_model_samples_at_its_own_resolution_and_a_lora_row_is_checked_against_its_training(
        tmp_path, prompts_csv, tiny_lora):
    lora = tmp_path / "run"
    shutil.copytree(tiny_lora, lora)
    (lora / "config.json").write_text(json.dumps({"resolution": 32, "num_inference_steps": 4, "guidance_scale": 4.5}))
    sampling = {"num_inference_steps": 4, "guidance_scale": 1.0, "call_kwargs": {"max_sequence_length": 8}}
    models = [{"name": "tiny", "base": "builtin:tiny-sd3", "resolution": 16, **sampling},
              {"name": "tiny+lora", "base": "builtin:tiny-sd3", "lora": str(lora), **sampling}]
    with pytest.warns(UserWarning, match=r"'tiny\+lora' samples otherwise than its LoRA's training run: "
                                         r"guidance_scale 1.0 \(trained with 4.5\)$"):
        argv = _argv(tmp_path / "out", prompts_csv, lora, models=models, max_prompts_per_set=1, seeds=[0],
                     metrics=["clipscore"])
        assert evaluate_main(argv) == 0
    images = tmp_path / "out" / "images"
    assert Image.open(images / "tiny" / "0" / "mini" / "0000_0.png").size == (16, 16)
    assert Image.open(images / "tiny+lora" / "0" / "mini" / "0000_0.png").size == (32, 32)  # the config's
    assert json.loads((images / "tiny" / "0" / "mini" / "0000_0.json").read_text())["settings"]["resolution"] == 16


@pytest.mark.parametrize("variant,by_hand", [
    ({}, lambda a, b: np.linalg.norm(a - b)),  # the default: L2 between unnormalised embeddings
    ({"normalize": True}, lambda a, b: np.linalg.norm(a / np.linalg.norm(a) - b / np.linalg.norm(b))),
    ({"distance": "cosine", "scale": 100}, lambda a, b: 100 * (1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b))),
])
def test_clipdiversity_variant_is_chosen_in_the_config(evaluated, tmp_path, tiny_lora, variant, by_hand):
    from adrpo_diffusion.scorers import build_scorer

    source, prompts_csv = evaluated
    out = tmp_path / "out"
    shutil.copytree(source, out)
    metric_options = {**yaml.safe_load(TINY_CONFIG.read_text())["metric_options"]}
    metric_options["clipdiversity"] = {**metric_options["clipdiversity"], **variant}
    argv = _argv(out, prompts_csv, tiny_lora, metrics=["clipscore", "clipdiversity"], metric_options=metric_options)
    assert evaluate_main(argv) == 0

    cfg = load_eval_config(TINY_CONFIG, _overrides(out, prompts_csv, tiny_lora, metric_options=metric_options))
    clip = build_scorer("clip", model=cfg.metric_options["clipdiversity"]["model"], device="cpu")
    images = [Image.open(out / "images" / "tiny" / "1" / "mini" / f"0002_{k}.png") for k in (0, 1)]
    a, b = clip.image_embeddings(images).double().numpy()
    value = _results(out)["models"]["tiny"]["metrics"]["clipdiversity"]["per_prompt"]["mini/2"]["per_seed"]["1"]
    assert value == pytest.approx(by_hand(a, b), rel=1e-5)
    with pytest.raises(EvalConfigError, match=r"metric_options.clipdiversity: distance must be 'cosine' or 'l2'"):
        load_eval_config(TINY_CONFIG, _overrides(out, prompts_csv, tiny_lora,
                                                 metric_options={"clipdiversity": {"distance": "manhattan"}}))


def test_undecodable_image_is_reported_counted_and_left_out(evaluated, tmp_path, tiny_lora, capsys):
    source, prompts_csv = evaluated
    out = tmp_path / "out"
    shutil.copytree(source, out)
    broken = out / "images" / "tiny" / "0" / "mini" / "0001_0.png"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated PNG; its record still says it is done

    assert evaluate_main(_argv(out, prompts_csv, tiny_lora)) == 0
    assert "1 image(s) could not be decoded" in capsys.readouterr().err
    results = _results(out)
    assert [f["path"] for f in results["failed_images"]] == ["tiny/0/mini/0001_0.png"]
    assert results["models"]["tiny"]["failed_images"] == 1 and results["models"]["tiny+lora"]["failed_images"] == 0
    assert "Images that could not be decoded, left out:** tiny: 1 of 12" in (out / "table1.md").read_text()

    # the prompt's value for seed 0 is the score of its other image, not a mean with a zero
    other = out / "images" / "tiny" / "0" / "mini" / "0001_1.png"
    prompt = "A blue bird."
    for metric in ("clipscore", "aesthetic", "pickscore"):
        cached = json.loads((out / "scores" / f"{metric}.json").read_text())["values"]
        value = results["models"]["tiny"]["metrics"][metric]["per_prompt"]["mini/1"]["per_seed"]["0"]
        assert value == pytest.approx(cached[_cache_key(file_sha1(other), prompt)])
    # ClipDiversity needs two images: that group has no value, and says so
    diversity = results["models"]["tiny"]["metrics"]["clipdiversity"]
    assert diversity["groups_without_value"] == 1 and "0" not in diversity["per_prompt"]["mini/1"]["per_seed"]


def test_scoring_a_folder_of_images(evaluated, tmp_path, capsys, monkeypatch):
    source, _ = evaluated
    # the generator's own records are sidecars: rescoring its folder gives the same numbers
    assert evaluate_main(["--config", str(TINY_CONFIG), "--images_dir", str(source / "images"),
                          "--output_dir", str(tmp_path / "sidecars"), "--metrics", "[clipscore, clipdiversity]"]) == 0
    again, before = _results(tmp_path / "sidecars"), _results(source)
    for metric in ("clipscore", "clipdiversity"):  # float32 scores batched otherwise: 1.0e-6 relative seen
        assert again["models"]["tiny+lora"]["metrics"][metric]["mean"] == pytest.approx(
            before["models"]["tiny+lora"]["metrics"][metric]["mean"], rel=1e-5)

    # a folder made elsewhere, prompts from a CSV; one seed, so no standard error
    folder = tmp_path / "made-elsewhere"
    folder.mkdir()
    rows = ["file,prompt"]
    for index, path in enumerate(sorted((source / "images" / "tiny" / "0" / "mini").glob("*.png"))):
        shutil.copy(path, folder / f"image{index}.png")
        rows.append(f"image{index}.png,{json.loads(path.with_suffix('.json').read_text())['prompt']}")
    (folder / "prompts.csv").write_text("\n".join(rows) + "\n")
    assert evaluate_main(["--config", str(TINY_CONFIG), "--images_dir", str(folder), "--images_prompts",
                          str(folder / "prompts.csv"), "--output_dir", str(tmp_path / "csv"),
                          "--metrics", "[clipscore, clipdiversity]"]) == 0
    results = _results(tmp_path / "csv")
    summary = results["models"]["made-elsewhere"]["metrics"]["clipscore"]
    assert summary["n_prompts"] == 3 and summary["se"] is None
    assert summary["mean"] == pytest.approx(before["models"]["tiny"]["metrics"]["clipscore"]["per_seed"]["0"], rel=1e-5)
    assert "± n/a" in (tmp_path / "csv" / "table1.md").read_text()

    # made elsewhere: nothing to regenerate them from. Refused by name before any model loads, or skipped on request.
    good = (folder / "image2.png").read_bytes()
    (folder / "image0.png").write_bytes(b"not an image")
    (folder / "image1.png").write_bytes(b"")
    (folder / "image2.png").write_bytes(good[: len(good) // 2])  # truncated
    argv = ["--config", str(TINY_CONFIG), "--images_dir", str(folder), "--images_prompts", str(folder / "prompts.csv"),
            "--output_dir", str(tmp_path / "broken"), "--metrics", "[clipscore]"]
    capsys.readouterr()
    with monkeypatch.context() as patched:
        patched.setattr("adrpo_diffusion.evaluation.cli.score_all", None)  # nothing may be scored (or loaded)
        assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert "3 of 6 images under" in err and "cannot be decoded" in err and "--skip_bad_images true" in err
    for name in ("image0.png", "image1.png", "image2.png"):
        assert str(folder / name) in err
    (folder / "image2.png").write_bytes(good)
    assert evaluate_main([*argv, "--skip_bad_images", "true"]) == 0
    err = capsys.readouterr().err
    assert "skipping 2 of 6 images that cannot be decoded" in err
    kept = {row.split(",", 1)[1] for row in rows[1:] if row.split(",")[0] not in ("image0.png", "image1.png")}
    assert _results(tmp_path / "broken")["models"]["made-elsewhere"]["metrics"]["clipscore"]["n_prompts"] == len(kept)


def test_missing_optional_dependencies_are_reported_before_any_work(prompts_csv, monkeypatch):
    from adrpo_diffusion.evaluation import config

    monkeypatch.setattr(config, "find_spec", lambda name: None)
    with pytest.raises(EvalConfigError) as info:
        load_eval_config(overrides=_config(prompts_csv, metrics=["clipscore", "clipdiversity", "hpsv2"]))
    message = str(info.value)
    assert "the reward_vs_diversity.png plot needs matplotlib, which is not installed" in message
    assert "the hpsv2 metric needs open_clip_torch" in message and 'pip install -c constraints-ci.txt -e ".[eval]"' in message
    load_eval_config(overrides=_config(prompts_csv, metrics=["clipscore"]))  # needs neither


@pytest.mark.slow
def test_log_is_short_and_interrupted_temporaries_are_removed(tmp_path, tiny_lora):
    """Prompts longer than CLIP's 77 tokens: diffusers warns per batch, listing the cut text padded with hundreds of
    <|endoftext|>; the evaluation shows that once, short. Run as a user does, to see its whole log."""
    import subprocess
    import sys

    prompts = tmp_path / "long.csv"
    prompts.write_text("prompt\n" + "".join(f"A {colour} car parked in front of a very tall building on a rainy evening "
                                            "in the old part of town with people holding umbrellas walking past it\n"
                                            for colour in ("red", "blue", "green")))
    out = tmp_path / "out"
    orphan = out / "images" / "tiny" / "0" / "mini" / ".tmp-999-0000_0.png"  # left by a killed run
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"partial")
    done = subprocess.run([sys.executable, "-m", "adrpo_diffusion.evaluation.cli",
                           *_argv(out, prompts, tiny_lora, metrics=["clipscore"], batch_size=2)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert log.count("can only handle sequences up to 77 tokens") == 1 and "<|endoftext|>" not in log
    assert len(log) < 15_000, len(log)
    assert not orphan.exists() and not list(out.rglob(".tmp-*"))


def test_a_custom_metric_scores_a_folder_like_a_built_in_one(evaluated, tmp_path):
    source, _ = evaluated
    rewards = tmp_path / "my_metrics.py"
    rewards.write_text("def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    name = f"{rewards}:brightness"
    out = tmp_path / "out"
    assert evaluate_main(["--config", str(TINY_CONFIG), "--images_dir", str(source / "images"), "--output_dir", str(out),
                          "--metrics", name, "--reward_metric", name]) == 0
    summary = _results(out)["models"]["tiny"]["metrics"][name]
    from PIL import Image

    pixels = [np.asarray(Image.open(p).convert("RGB"), dtype=float).mean() / 255
              for p in sorted((source / "images" / "tiny").rglob("*.png"))]
    assert summary["mean"] == pytest.approx(np.mean(pixels), abs=1e-6)  # every prompt has as many images
    assert name in (out / "table1.md").read_text()
