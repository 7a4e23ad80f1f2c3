"""The package's shape: imports go one way (down the layers), and the cheap entry points stay cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ppvit

SRC = Path(ppvit.__file__).parent
LAYERS = ("_io", "_schema", "_compat", "crypto", "data", "models", "train", "attacks", "experiments", "serve", "cli")
"""Lowest first: a module may import from its own layer or a lower one, never a higher one."""
HEAVY = ("torch", "timm", "peft", "accelerate", "matplotlib", "scipy", "skimage")


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "ppvit" or len(parts) == 1:
        return -1  # the package root (``from ppvit import __version__``) sits below everything
    return LAYERS.index(parts[1])


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ppvit import in a file, including the ones inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, m) for line, m in found if m == "ppvit" or m.startswith("ppvit.")]


def test_every_module_sits_in_a_known_layer() -> None:
    tops = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.glob("*") if p.name != "__pycache__"}
    assert tops - {"__init__", "__main__"} <= set(LAYERS)


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] in ("__init__.py", "__main__.py"):
            continue
        own = LAYERS.index(rel.parts[0].removesuffix(".py"))
        wrong += [
            f"{rel}:{line} imports {m}" for line, m in imported_modules(path) if m != "ppvit" and layer_of(m) > own
        ]
    assert not wrong, "\n".join(wrong)


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ppvit modules it imports, at module level or inside functions (``from ppvit.serve import
    app`` counts as importing ``ppvit.serve.app``)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        edges &= set(modules)
        edges.discard(name)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each module that lies on one (depth-first search; a circle is reported once per entry)."""
    circles, done = [], set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                circles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt, [*stack, nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return circles


def test_import_circles_are_found() -> None:
    """The search itself: a two-module and a three-module circle, and none in a chain."""
    assert import_circles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circle() -> None:
    """No module imports one that imports it back, directly or round a loop, even from inside a function
    (a circle inside a package is a seam drawn in the wrong place: issue 31). A package's ``__init__``
    forwarding its submodules' names is an edge like any other."""
    circles = import_circles(import_graph())
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_no_relative_imports() -> None:
    """Absolute imports only, so that the layer check above sees every edge."""
    relative = [
        f"{p.relative_to(SRC)}:{n.lineno}"
        for p in SRC.rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.ImportFrom) and n.level > 0
    ]
    assert not relative


def loaded_after(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running ``code`` (even if it exits)."""
    report = "import atexit, sys; atexit.register(lambda: print(' '.join(sorted(sys.modules)), file=sys.stderr))\n"
    out = subprocess.run([sys.executable, "-c", report + code], capture_output=True, text=True, timeout=120)
    return {m.split(".")[0] for m in out.stderr.split()}


@pytest.mark.parametrize(
    "code",
    [
        "import ppvit",
        "from ppvit.cli import main; main(['--help'])",
        "from ppvit.cli import main; main(['train', '--help'])",
        "from ppvit.cli import main; main(['keygen', '/nonexistent-folder/k.key'])",
        "import ppvit.crypto.keys",
    ],
    ids=["import", "help", "train-help", "keygen", "keys"],
)
def test_cheap_entry_points_import_no_heavy_dependency(code: str) -> None:
    loaded = loaded_after(code)
    assert "ppvit" in loaded  # the check itself worked
    assert not loaded & set(HEAVY)


def test_the_client_needs_no_training_stack() -> None:
    assert not loaded_after("import ppvit.serve.client") & {
        "timm",
        "peft",
        "accelerate",
        "matplotlib",
        "scipy",
        "skimage",
    }


def test_one_version_number() -> None:
    import tomllib

    project = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    from importlib.metadata import version

    assert version("ppvit") == ppvit.__version__


def test_every_public_name_of_0_2_resolves_at_its_old_path() -> None:
    """``from ppvit.keys import Key`` and the like keep working (with a DeprecationWarning) for one release.

    api_0_2.json: the public top-level names of each module of ppvit 0.2, read from its source.
    """
    import importlib
    import json
    import warnings

    old_api = json.loads((Path(__file__).parent / "api_0_2.json").read_text())
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for module, names in old_api.items():
            mod = importlib.import_module(f"ppvit.{module}")
            missing += [f"ppvit.{module}.{n}" for n in names if not hasattr(mod, n)]
    removed = {"ppvit.sources.describe", "ppvit.sources.source_classes"}  # dead in 0.2 (issue 21): deleted
    assert sorted(set(missing) - removed) == []
