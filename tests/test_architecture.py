"""The package's import direction, read from the source with ``ast`` (every import, top-level or inside a function):

    core (utils, settings, seeds, builtin, advantages, losses, methods, prompts, tasks, faults)
      <- models (families, scorers)
      <- training and evaluation (config, checkpoint, callbacks, trainer, evaluation)
      <- apps (lab, benchmark, hub, llm)
      <- commands (cli, evaluation.cli)

A module imports only from its own layer or the ones below, no two modules import each other through any chain,
and product code never imports the test models of ``testing`` (they are reached through their ``builtin:`` names;
``testing`` itself may use core and models).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adrpo_diffusion"
LAYERS = [  # (layer, module-name prefixes); the longest matching prefix decides
    ("core", ["", "utils", "settings", "seeds", "builtin", "advantages", "losses", "methods", "prompts", "tasks", "faults"]),
    ("models", ["families", "scorers"]),
    ("training/evaluation", ["config", "checkpoint", "callbacks", "trainer", "evaluation"]),
    ("apps", ["lab", "benchmark", "benchmark_e2e", "benchmark_models", "hub", "llm"]),
    ("commands", ["cli", "evaluation.cli"]),
]
TESTING = "testing"
TESTING_MAY_IMPORT = ("core", "models")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from .x import y`` counts ``x.y`` when that is a module, else ``x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("adrpo_diffusion"):
                target = node.module.removeprefix("adrpo_diffusion").lstrip(".")
            else:
                continue
            subs = [f"{target}.{a.name}".lstrip(".") for a in node.names]
            targets = [s for s in subs if s in known] or [target]
            if len(targets) < len(subs) and target in known:
                targets.append(target)  # names from the module itself, besides submodules
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("adrpo_diffusion").lstrip(".") for a in node.names
                       if a.name.startswith("adrpo_diffusion")]
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer_of(name: str) -> int | None:
    """Index in LAYERS of ``name``'s layer (None for the testing package)."""
    if name == TESTING or name.startswith(TESTING + "."):
        return None
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) > best:
                best, index = len(prefix), i
    return index


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import against the layer order, into ``testing`` from product code, and every import cycle."""
    problems = []
    for name, targets in sorted(graph.items()):
        mine = layer_of(name)
        for target in sorted(targets):
            theirs = layer_of(target)
            if mine is None:  # testing: core and models only
                if theirs is not None and LAYERS[theirs][0] not in TESTING_MAY_IMPORT:
                    problems.append(f"{name} (testing) imports {target} ({LAYERS[theirs][0]})")
            elif theirs is None:
                problems.append(f"{name} ({LAYERS[mine][0]}) imports the test models {target}")
            elif theirs > mine:
                problems.append(f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}), a layer above")
    problems += ["import cycle: " + " <-> ".join(c) for c in cycles(graph)]
    return problems


def test_every_module_has_a_layer():
    assert all(layer_of(name) is not None or name.startswith(TESTING) for name in modules())
    assert layer_of("llm.audio_trainer") == 3 and layer_of("evaluation.cli") == 4 and layer_of("evaluation.score") == 2


def test_imports_follow_the_layers_without_cycles():
    graph = import_graph()
    assert graph["trainer"] >= {"config", "methods", "families"}  # the graph is really read
    assert "llm.cli" in graph["llm.audio_eval"]  # a function-level import
    assert violations(graph) == []


@pytest.mark.parametrize("added, expected", [
    (("losses", "trainer"), "losses (core) imports trainer (training/evaluation), a layer above"),
    (("scorers.clip", "testing.tiny_scorers"), "scorers.clip (models) imports the test models testing.tiny_scorers"),
    (("testing.shapes_base", "trainer"), "testing.shapes_base (testing) imports trainer (training/evaluation)"),
    (("families.base", "families.sd3"), "import cycle: families.base <-> families.sd3"),
])
def test_a_wrong_way_import_is_reported(added, expected):
    graph = import_graph()
    source, target = added
    graph[source] = graph[source] | {target}
    assert expected in violations(graph)


def test_the_reader_sees_a_wrong_way_import_in_source(tmp_path, monkeypatch):
    """The same check on a copy of the package whose ``losses.py`` gains ``from .trainer import Trainer`` inside a
    function."""
    import shutil

    copy = tmp_path / "adrpo_diffusion"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "losses.py").open("a") as f:
        f.write("\n\ndef _late():\n    from .trainer import Trainer\n\n    return Trainer\n")
    monkeypatch.setitem(globals(), "PACKAGE", copy)
    assert "losses (core) imports trainer (training/evaluation), a layer above" in violations(import_graph())
