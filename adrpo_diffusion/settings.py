"""The one config engine of every command (``adrpo-train``, ``adrpo-evaluate``, ``adrpo-lab``, ``adrpo-grpo``).

A command's settings are a dataclass whose fields carry their help (:func:`documented`, :func:`required`). The
engine reads them from a YAML file with ``--key value`` overrides on top (:func:`arg_parser`,
:func:`overrides_from_args`, :func:`load`), checks keys and types, and reports every problem at once, each
unknown key with its did-you-mean (:func:`from_mapping`). What a field's value may be beyond its type (ranges,
files, names) each command checks itself, after this, still before anything heavy loads.

Types: ``bool``, ``int``, ``float`` (an int or a numeric string such as YAML's ``1e-4`` is read as a float),
``str`` (a number is read as its text, unless the field also takes another type), ``list``, ``dict``, a union of
them (``str | list``) and ``X | None``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from pathlib import Path

from .utils import did_you_mean


class ConfigError(ValueError):
    """A config's problems, listed one per line."""


def documented(default, help: str):
    """A dataclass field with a help string (shown by each command's ``--help``); a list or dict default is copied
    for every instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def required(help: str):
    """A dataclass field without a default: a config that leaves it out is refused, with this help."""
    return field(metadata={"help": help})


def load_yaml_mapping(path: str | os.PathLike, error: type[Exception] = ConfigError) -> dict:
    """The mapping a YAML config file holds (empty file: ``{}``); ``error`` for a missing file, bad YAML or a
    top level that is not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"Config file {path} does not exist.")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise error(f"{path} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise error(f"{path} must hold a mapping of config keys to values.")
    return loaded


def unknown_keys_message(keys: Iterable[str], valid: Iterable[str], where: str,
                         hint: Callable[[str], str | None] = lambda key: None) -> str:
    """``Unknown config key(s) in <where>: 'key' (did you mean 'x'?), ... Valid keys: ...``; ``hint(key)``, when it
    returns text, replaces the did-you-mean of that key."""
    valid = list(valid)
    names = ", ".join(f"{key!r}{hint(key) or did_you_mean(key, valid)}" for key in keys)
    return f"Unknown config key(s) in {where}: {names}. Valid keys: {', '.join(valid)}"


def field_types(cls, name: str) -> tuple[tuple[type, ...], bool]:
    """The types a field of ``cls`` takes (``list[int]`` reads as ``list``), and whether it takes None."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        kinds = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
        return kinds, type(None) in args
    return (typing.get_origin(hint) or hint,), False


def _typed(value, kinds: tuple[type, ...]):
    """``value`` as one of ``kinds``, or raises ValueError."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and (number or isinstance(value, str)):
            try:
                return float(value)
            except ValueError:
                continue
        if kind is str and (isinstance(value, str) or (number and kinds == (str,))):
            return str(value)
        if kind not in (bool, int, float, str) and isinstance(value, kind):
            return value
    raise ValueError


def _type_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(getattr(k, "__name__", str(k)) for k in kinds)


def from_mapping(cls, values, where: str, problems: list[str], hint: Callable[[str], str | None] = lambda key: None,
                 convert: Mapping[str, Callable] | None = None, prefix: str = ""):
    """``cls(**values)`` after checking keys and types, or None with the problems appended to ``problems`` (unknown
    keys with their did-you-mean or ``hint``, missing required keys, wrong types). ``where`` names the mapping in
    messages, ``prefix`` its keys (``models[0].``). ``convert[name](value)`` reads a field the types cannot say
    (raising ValueError with the problem)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        problems.append(f"{where} must be a mapping with keys {', '.join(fields)}, got {values!r}")
        return None
    before = len(problems)
    unknown = [k for k in values if k not in fields]
    if unknown:
        problems.append(unknown_keys_message(unknown, fields, where, hint))
    typed = {}
    for key, value in values.items():
        if key not in fields:
            continue
        kinds, optional = field_types(cls, key)
        try:
            if convert and key in convert:
                typed[key] = convert[key](value)
            elif value is None and optional:
                typed[key] = None
            else:
                typed[key] = _typed(value, kinds)
        except ValueError as err:
            problems.append(str(err) if str(err) else
                            f"{prefix}{key} must be {_type_name(kinds)}{' or null' if optional else ''}, got {value!r} "
                            f"({type(value).__name__})")
    for key, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and key not in values:
            problems.append(f"{where} needs '{key}' ({f.metadata['help']})")
    return cls(**typed) if len(problems) == before else None


def read_values(cls, path: str | os.PathLike | None, overrides: dict | None, problems: list[str], *,
                under: dict | None = None, error: type[Exception] = ConfigError, hint=lambda key: None,
                overrides_from: str = "the overrides") -> dict:
    """The values of ``under`` (e.g. a preset), the YAML file (if any) and ``overrides`` (from the command line:
    ``overrides_from``), each on top of the one before. Unknown keys are named in ``problems`` with where they came
    from, and dropped."""
    fields = [f.name for f in dataclasses.fields(cls)]
    values = {}
    sources = ((None, under or {}), (str(path), load_yaml_mapping(path, error) if path is not None else {}),
               (overrides_from, overrides or {}))
    for where, given in sources:
        unknown = [k for k in given if k not in fields]
        if unknown and where:
            problems.append(unknown_keys_message(unknown, fields, where, hint))
        values.update({k: v for k, v in given.items() if k in fields})
    return values


def source_text(path, overrides) -> str:
    return f"{path or 'no config file'}{', with overrides' if overrides else ''}"


def load(cls, path: str | os.PathLike | None = None, overrides: dict | None = None, *, under: dict | None = None,
         error: type[Exception] = ConfigError, name: str = "config", hint=lambda key: None, convert=None,
         overrides_from: str = "the overrides"):
    """``cls`` from :func:`read_values`; ``error`` lists every key and type problem."""
    problems: list[str] = []
    values = read_values(cls, path, overrides, problems, under=under, error=error, hint=hint,
                         overrides_from=overrides_from)
    config = from_mapping(cls, values, source_text(path, overrides), problems, hint, convert)
    if problems:
        raise error(f"Invalid {name} ({source_text(path, overrides)}):\n  " + "\n  ".join(problems))
    return config


def _default_text(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return json.dumps(default) if isinstance(default, (list, dict)) else str(default)


def arg_parser(cls, prog: str, description: str, epilog: str | None = None,
               config_help: str = "YAML config file (see configs/).") -> argparse.ArgumentParser:
    """``--config FILE`` and ``--<field> VALUE`` for every field of ``cls`` (a list field takes several values). A
    command adds its own flags to it."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=config_help)
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, metavar="VALUE",
                            nargs="+" if list in field_types(cls, f.name)[0] else None,  # argparse reads help as a
                            help=f"{f.metadata['help']} (default: {_default_text(f)})".replace("%", "%%"))  # %-format
    return parser


def command_line_value(raw: str | list[str], parse: Callable[[str], object], is_list: bool):
    """A config key's value from the command line, where list keys take ``nargs="+"``: several words are a list of
    parsed items (``--seeds 0 1``); one word is its parsed value (``--seeds '[0, 1]'``), put in a list for a list key
    (``--seeds 0``)."""
    if not isinstance(raw, list):
        return parse(raw)
    values = [parse(item) for item in raw]
    value = values[0] if len(values) == 1 else values
    return [value] if is_list and not isinstance(value, list) else value


def overrides_from_args(cls, parser: argparse.ArgumentParser, argv=None, *, error: type[Exception] = ConfigError,
                        text_fields: Iterable[str] = ()) -> tuple[argparse.Namespace, dict]:
    """The command line parsed by ``parser`` (from :func:`arg_parser`): its namespace (``config`` and the command's
    own flags) and the fields given, as overrides. Values are read as YAML (``--method_options '{beta0: 0.5}'``),
    except for fields typed only ``str`` and ``text_fields``, which keep their text. An unknown ``--flag`` is kept
    as an override (with the value None), for :func:`read_values` to name with the config's other problems."""
    import yaml

    args, unknown = parser.parse_known_args(argv)
    if unknown and not any(a.startswith("--") for a in unknown):
        raise error(f"Unexpected argument(s) {' '.join(unknown)}: give every key as --key value.")
    overrides = {a[2:].split("=")[0]: None for a in unknown if a.startswith("--")}
    for f in dataclasses.fields(cls):
        if f.name in vars(args):
            kinds = field_types(cls, f.name)[0]
            text = kinds == (str,) or f.name in text_fields
            overrides[f.name] = command_line_value(vars(args).pop(f.name), str if text else yaml.safe_load,
                                                   kinds == (list,))
    return args, overrides
