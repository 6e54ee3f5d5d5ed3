"""Bad input gets a clear error before any model loads."""

import dataclasses
import sys

import pytest

from adrpo_diffusion import cli, trainer
from adrpo_diffusion.config import ConfigError, config_from_args, load_config


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(trainer, "load_family", refuse)


def run_cli(argv, capsys):
    code = cli.train_main(argv)
    return code, capsys.readouterr().err


@pytest.fixture
def config_file(tmp_path):
    def write(text):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_unknown_config_key_names_valid_keys(config_file, capsys):
    code, err = run_cli(["--config", config_file("learnig_rate: 1.0\nbeta0: 1.0\nmax_steps: 3\n")], capsys)
    assert code == 2
    assert "Unknown config key(s)" in err and "'learnig_rate' (did you mean 'learning_rate'?)" in err
    assert "'beta0' (a parameter of adrpo: give it in method_options)" in err
    assert "Valid keys:" in err and "method_options" in err


def test_unknown_command_line_flag(capsys):
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", "--learning_rat", "1e-3"], capsys)
    assert code == 2 and "'learning_rat' (did you mean 'learning_rate'?)" in err


@pytest.mark.parametrize(
    "override, message",
    [
        (["--method_options", "{beta0: 0}"], "beta0 must be > 0"),
        (["--method_options", "{beta0: -1}"], "beta0 must be > 0"),
        (["--method_options", "{advantage_min: 1, advantage_max: 1}"], "advantage_min (1.0) must be < advantage_max (1.0)"),
        (["--method", "dpo", "--method_options", "{dpo_beta: 1}"], "Unknown config key(s) in method_options of dpo: "
                                                                    "'dpo_beta' (did you mean 'beta'?). Valid keys: "
                                                                    "beta, pairs, min_gap"),
        (["--method", "raft", "--method_options", "{top_k: 8}"], "top_k must be in [1, images_per_prompt - 1 = 7]"),
        (["--method_options", "[1]"], "method_options must be dict"),
        (["--images_per_prompt", "1"], "images_per_prompt (K) must be >= 2"),
        (["--updates_per_rollout", "0"], "updates_per_rollout must be >= 1, got 0"),
        (["--method", "ppo"], "method must be one of"),
        (["--max_steps", "two"], "max_steps must be int"),
        (["--resolution", "30"], "multiple of 16"),
    ],
)
def test_impossible_values(override, message, capsys):
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", *override], capsys)
    assert code == 2 and message in err


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny_cpu.yaml", {"method_options": {"beta0": 0.0}, "images_per_prompt": 1})
    assert "beta0" in str(info.value) and "images_per_prompt" in str(info.value)


def test_warns_when_a_max_exceeds_beta0():
    with pytest.warns(UserWarning, match="negative W2"):
        load_config("configs/tiny_cpu.yaml", {"method_options": {"beta0": 0.5}})


def test_overrides_are_typed():
    cfg = config_from_args(["--config", "configs/tiny_cpu.yaml", "--learning_rate", "1e-2", "--eval_seeds", "[7, 8]",
                            "--max_steps", "3", "--resume_from_checkpoint", "latest"])
    assert cfg.learning_rate == 0.01 and cfg.eval_seeds == [7, 8] and cfg.max_steps == 3
    assert cfg.resume_from_checkpoint == "latest"


@pytest.mark.parametrize(
    "name, content, message",
    [("empty.txt", "\n\n", "contains no prompts"), ("bad.jsonl", "{oops\n", "not valid JSON")],
)
def test_bad_prompt_files(tmp_path, name, content, message, capsys):
    (tmp_path / name).write_text(content)
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", "--prompt_file", str(tmp_path / name)], capsys)
    assert code == 2 and message in err


def test_prompt_file_list_and_heldout_fraction(capsys):
    cfg = config_from_args(["--config", "configs/tiny_cpu.yaml", "--prompt_file", "[prompts/colors.txt, prompts/colors.txt]",
                            "--heldout_fraction", "0.25"])
    assert cfg.prompt_file == ["prompts/colors.txt"] * 2 and cfg.heldout_fraction == 0.25
    for flag, value, message in [("--heldout_fraction", "1", "heldout_fraction must be in [0, 1), got 1.0"),
                                 ("--decoupled_normalization", "1.5", "decoupled_normalization must be in [0, 1], got 1.5"),
                                 ("--prompt_file", "[]", "prompt_file must be a file or a non-empty list of files"),
                                 ("--prompt_file", "7", "prompt_file must be str or list, got 7 (int)")]:
        code, err = run_cli(["--config", "configs/tiny_cpu.yaml", flag, value], capsys)
        assert code == 2 and message in err, err


def test_prompts_the_reward_cannot_score(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red apple\na tall tree\n")
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", "--prompt_file", str(tmp_path / "p.txt")], capsys)
    assert code == 2 and "needs a colour word" in err and "a tall tree" in err


def test_unknown_reward_and_reward_option(capsys):
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", "--reward", "aesthetics-v9"], capsys)
    assert code == 2 and "Unknown scorer 'aesthetics-v9'" in err
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", "--reward_options", "{size: 3}"], capsys)
    assert code == 2 and "Unknown option(s) ['size'] for scorer 'color'" in err


@pytest.mark.parametrize(
    "model, message",
    [
        ("stabilityai/not-cached-here", "HF_HUB_OFFLINE is set"),
        ("/no/such/dir/sd3", "neither a local file or directory nor a hub id"),
        ("builtin:huge-sd3", "Unknown built-in model"),
    ],
)
def test_unreachable_model_says_how_to_pass_a_local_path(model, message, capsys):
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", "--pretrained_model", model], capsys)
    assert code == 2 and message in err
    if "builtin" not in model:
        assert "and pass the directory: --pretrained_model /models/" in err


def test_directory_without_model_index(tmp_path, capsys):
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", "--pretrained_model", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path} is a directory without model_index.json" in err


def test_resume_from_a_missing_checkpoint(tmp_path, capsys):
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", "--resume_from_checkpoint", str(tmp_path / "step-9")], capsys)
    assert code == 2 and "is not a checkpoints/step-N directory" in err


@pytest.mark.parametrize("module, entry, fields", [
    ("adrpo_diffusion.cli", "train_main", "adrpo_diffusion.config"),
    ("adrpo_diffusion.evaluation.cli", "evaluate_main", "adrpo_diffusion.evaluation.config"),
    ("adrpo_diffusion.benchmark", "main", None),
    ("adrpo_diffusion.lab.experiment", "main", None),
    ("adrpo_diffusion.hub", "main", None),
])
def test_help_documents_every_key(module, entry, fields, capsys):
    import importlib

    with pytest.raises(SystemExit) as info:
        getattr(importlib.import_module(module), entry)(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    for name in importlib.import_module(fields).FIELDS if fields else ():
        assert f"--{name} VALUE" in out, name


def test_output_dir_of_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", "--output_dir", str(out)], capsys)
    assert code == 2 and "holds another run (config.json, metrics.jsonl)" in err
    assert "--resume_from_checkpoint latest" in err and "--overwrite_output_dir true" in err
    assert (out / "config.json").read_text() == "{}" and (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def fake_checkpoint(directory, config):
    """A checkpoint directory with two files and the manifest the trainer writes (no training needed)."""
    from adrpo_diffusion.checkpoint import write_manifest

    directory.mkdir(parents=True)
    (directory / "optimizer.bin").write_bytes(b"o" * 1000)
    (directory / "random_states_0.pkl").write_bytes(b"r" * 100)
    write_manifest(directory, dataclasses.asdict(config))
    return directory


def test_resume_with_a_changed_config_names_the_keys(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--config", "configs/tiny_cpu.yaml", "--output_dir", str(out)]
    fake_checkpoint(out / "checkpoints" / "step-2", config_from_args([*base, "--lora_rank", "8"]))
    (out / "config.json").write_text("{}")
    code, err = run_cli([*base, "--lora_rank", "4", "--method", "raft", "--method_options", "{}", "--max_steps", "99",
                         "--resume_from_checkpoint", "latest"], capsys)
    assert code == 2 and f"Cannot resume from {out / 'checkpoints' / 'step-2'}" in err
    assert "lora_rank: 8 in the checkpoint, 4 now" in err and "method: 'adrpo' in the checkpoint, 'raft' now" in err
    assert "max_steps" not in err  # may change on resume
    assert (out / "config.json").read_text() == "{}"  # not overwritten


def test_incomplete_checkpoints_are_named_and_latest_falls_back(tmp_path):
    from adrpo_diffusion.checkpoint import CheckpointError, resolve_resume

    cfg = load_config("configs/tiny_cpu.yaml", {"output_dir": str(tmp_path)})
    config = dataclasses.asdict(cfg)
    root = tmp_path / "checkpoints"
    step2, step4 = fake_checkpoint(root / "step-2", cfg), fake_checkpoint(root / "step-4", cfg)
    assert resolve_resume("latest", root, config) == step4
    (step4 / "optimizer.bin").write_bytes(b"o" * 10)  # truncated
    logged = []
    assert resolve_resume("latest", root, config, logged.append) == step2
    assert len(logged) == 1 and str(step4 / "optimizer.bin") in logged[0] and "truncated" in logged[0]
    with pytest.raises(CheckpointError, match="optimizer.bin is truncated"):
        resolve_resume(str(step4), root, config)
    (step2 / "random_states_0.pkl").write_bytes(b"x" * 100)  # same size, other content
    with pytest.raises(CheckpointError, match="no complete checkpoint") as info:
        resolve_resume("latest", root, config, logged.append)
    assert "optimizer.bin is truncated" in str(info.value) and "random_states_0.pkl is corrupted" in str(info.value)
    (step2 / "manifest.json").unlink()  # e.g. a checkpoint of an older version
    with pytest.raises(CheckpointError, match="step-2/manifest.json is missing"):
        resolve_resume(str(step2), root, config)


def test_ctrl_c_prints_where_to_resume_and_exits_130(tmp_path, monkeypatch, capsys):
    class Interrupted:
        def __init__(self, cfg):
            (tmp_path / "out" / "checkpoints" / "step-20").mkdir(parents=True)

        def train(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "Trainer", Interrupted)
    code, err = run_cli(["--config", "configs/tiny_cpu.yaml", "--output_dir", str(tmp_path / "out"),
                         "--overwrite_output_dir=true"], capsys)
    assert code == 130 and "Traceback" not in err
    assert f"the last checkpoint is {tmp_path / 'out' / 'checkpoints' / 'step-20'}" in err
    assert (f"adrpo-train --config configs/tiny_cpu.yaml --output_dir {tmp_path / 'out'} --resume_from_checkpoint latest"
            in err)


def test_every_command_takes_a_list_as_several_values_or_one_yaml_list(tmp_path):
    from adrpo_diffusion.evaluation.config import eval_config_from_args

    for given, seeds in ((["1", "2"], [1, 2]), (["[1, 2]"], [1, 2]), (["7"], [7])):
        assert config_from_args(["--config", "configs/tiny_cpu.yaml", "--eval_seeds", *given]).eval_seeds == seeds
        evaluation = eval_config_from_args(["--config", "configs/eval_tiny_cpu.yaml", "--images_dir", str(tmp_path),
                                            "--seeds", *given])
        assert evaluation.seeds == seeds
    files = ["prompts/colors.txt", "prompts/shapes.txt"]
    assert config_from_args(["--config", "configs/tiny_cpu.yaml", "--prompt_file", *files]).prompt_file == files
    assert config_from_args(["--config", "configs/tiny_cpu.yaml", "--prompt_file", files[0]]).prompt_file == files[0]


def test_train_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cli.train_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(trainer.TrainConfig)}
    assert out.count("(default: ") == len(defaults)
    assert f"(default: {defaults['learning_rate']})" in out and "(default: [1000, 1001])" in out


@pytest.mark.parametrize("entry", ["adrpo_diffusion.cli:train_main", "adrpo_diffusion.evaluation.cli:evaluate_main",
                                   "adrpo_diffusion.lab.experiment:main", "adrpo_diffusion.benchmark:main",
                                   "adrpo_diffusion.hub:main", "adrpo_diffusion.llm.cli:main"])
def test_every_commands_help_works_without_the_optional_extras(entry, monkeypatch, capsys):
    """What a user has after the Try-it install: no matplotlib, open_clip or TRL (the eval, lab and llm extras)."""
    import importlib

    for extra in ("matplotlib", "open_clip", "trl"):
        monkeypatch.setitem(sys.modules, extra, None)  # import fails as if not installed
    module, function = entry.split(":")
    with pytest.raises(SystemExit) as info:
        getattr(importlib.import_module(module), function)(["--help"])
    assert info.value.code == 0 and "--help" in capsys.readouterr().out
