"""The config engine every command uses (adrpo_diffusion/settings.py): keys, types, every problem at once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from adrpo_diffusion import settings
from adrpo_diffusion.settings import ConfigError, documented, required


@dataclass
class Example:
    name: str = required("The name.")
    rate: float = documented(0.5, "A rate.")
    steps: int = documented(3, "Steps.")
    files: str | list = documented("a.txt", "A file or a list of files.")
    seeds: list = documented([0], "Seeds.")
    limit: int | None = documented(None, "A limit or none.")
    verbose: bool = documented(False, "Talk.")


def test_types_are_read_and_checked():
    problems = []
    got = settings.from_mapping(Example, {"name": 7, "rate": "1e-4", "steps": 4, "files": ["a", "b"], "limit": None},
                                "config", problems)
    assert problems == [] and got == Example(name="7", rate=1e-4, steps=4, files=["a", "b"], limit=None)
    assert isinstance(got.rate, float) and got.seeds == [0] and got.seeds is not Example(name="x").seeds
    problems = []
    assert settings.from_mapping(Example, {"name": "x", "rate": True, "steps": 1.5, "files": 7, "seeds": 3,
                                           "verbose": 1, "limit": "x"}, "config", problems) is None
    assert problems == ["rate must be float, got True (bool)", "steps must be int, got 1.5 (float)",
                        "files must be str or list, got 7 (int)", "seeds must be list, got 3 (int)",
                        "verbose must be bool, got 1 (int)", "limit must be int or null, got 'x' (str)"]


def test_unknown_and_missing_keys_are_named_with_everything_else():
    problems = []
    settings.from_mapping(Example, {"rat": 1.0, "steps": "x"}, "my.yaml", problems, prefix="models[0].")
    assert problems[0].startswith("Unknown config key(s) in my.yaml: 'rat' (did you mean 'rate'?). Valid keys: name,")
    assert problems[1:] == ["models[0].steps must be int, got 'x' (str)", "my.yaml needs 'name' (The name.)"]
    problems = []
    settings.from_mapping(Example, {"name": "x", "rat": 1}, "config", problems, hint=lambda key: " (a hint)")
    assert "'rat' (a hint)" in problems[0]
    problems = []
    settings.from_mapping(Example, ["name"], "models[1]", problems)
    assert problems == ["models[1] must be a mapping with keys name, rate, steps, files, seeds, limit, verbose, "
                        "got ['name']"]


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\nrate: 2\nseeds: [1, 2]\n")
    parser = settings.arg_parser(Example, "example", "An example.")
    parser.add_argument("--dry", action="store_true")
    args, overrides = settings.overrides_from_args(Example, parser, ["--config", str(path), "--steps", "9", "--seeds",
                                                                     "4", "--files", "x.txt", "--dry"])
    assert overrides == {"steps": 9, "seeds": [4], "files": "x.txt"} and args.dry and args.config == str(path)
    got = settings.load(Example, args.config, overrides)
    assert (got.name, got.rate, got.steps, got.seeds, got.files) == ("run", 2.0, 9, [4], "x.txt")
    for given, seeds in ((["5", "6"], [5, 6]), (["[5, 6]"], [5, 6])):
        assert settings.overrides_from_args(Example, parser, ["--seeds", *given])[1] == {"seeds": seeds}
    assert settings.overrides_from_args(Example, parser, ["--name", "007"])[1] == {"name": "007"}  # text stays text
    args, overrides = settings.overrides_from_args(Example, parser, ["--stps", "3", "--rate", "x"])
    with pytest.raises(ConfigError) as info:  # the unknown flag named with the other problems
        settings.load(Example, path, overrides, overrides_from="the command line")
    assert "Unknown config key(s) in the command line: 'stps' (did you mean 'steps'?)" in str(info.value)
    assert "rate must be float, got 'x' (str)" in str(info.value)
    with pytest.raises(ConfigError, match="Unexpected argument"):
        settings.overrides_from_args(Example, parser, ["stray"])
    with pytest.raises(ConfigError) as info:
        settings.load(Example, path, {"steps": "many", "rates": 1})
    assert str(info.value).splitlines()[0] == f"Invalid config ({path}, with overrides):"
    assert "'rates' (did you mean 'rate'?)" in str(info.value) and "steps must be int, got 'many'" in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        settings.load(Example, tmp_path / "missing.yaml")
    assert "(default: [0])" in parser.format_help() and "--limit VALUE" in parser.format_help()
