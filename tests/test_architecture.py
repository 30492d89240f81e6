"""The layers drawn in docs/architecture.md hold: the drawing names every module, every richkd import points down
(or sideways within a layer), there is no import cycle, and only richkd/tune/ imports Ray. Read from the source
with `ast`, so imports inside functions and under `if TYPE_CHECKING:` count too."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "richkd"


def drawn_layers(doc: str) -> tuple[dict[str, int], tuple[str, ...]]:
    """({module or package: layer}, layer names bottom up) from the drawing under "## Layers": lines such as
    ` 3 training core    trainer · robustness.{engine, report}`, continued on lines that start `│` and text; a
    parenthesis is a comment."""
    drawing = re.sub(r"\n *│ {2,}(?=\S)", " ", doc.split("## Layers")[1].split("```")[1])
    layers, names = {}, {}
    for number, name, members in re.findall(r"^ *(\d) (\w+(?: \w+)*) {2,}(.*)$", drawing, re.MULTILINE):
        names[int(number)] = name
        members = re.sub(r"\(.*?\)|\s", "", members)
        for member in members.split("·"):
            head, _, inner = member.partition("{")
            for part in inner.rstrip("}").split(",") if inner else [""]:
                layers[f"richkd.{head}{part}"] = int(number)
    return layers, tuple(names[i] for i in sorted(names))


LAYERS, LAYER_NAMES = drawn_layers((REPO / "docs" / "architecture.md").read_text())


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def drawn_name(module: str) -> str | None:
    """The drawing's entry for a module: its own name or its nearest package's (the longest match)."""
    found = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    return max(found, key=len) if found else None


def layer_of(module: str) -> int:
    return 0 if module == "richkd" else LAYERS[drawn_name(module)]   # the package root holds the version only


def imports_of(module: str) -> dict[str, int]:
    """{imported module: line} for every import in `module` (module-level, in functions, under TYPE_CHECKING)."""
    return imports_in_source(MODULES[module].read_text())


def imports_in_source(source: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
            targets = [n if n in MODULES else node.module for n in names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            out.setdefault(target, node.lineno)
    return out


def richkd_imports(module: str) -> dict[str, int]:
    found = {}
    for target, line in imports_of(module).items():
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != module and target.startswith("richkd"):
            found.setdefault(target, line)
    return found


def test_the_drawing_names_every_module_and_nothing_else():
    assert "richkd.tune.spec" in MODULES and "richkd.trainer" in MODULES      # the walk found the package
    assert LAYER_NAMES == ("foundation", "building blocks", "teaching", "training core", "sweep layer",
                           "applications")                                  # the parser read every layer
    assert layer_of("richkd.robustness.engine") == 3 and layer_of("richkd.robustness.scores") == 1
    assert {"richkd.tune.errors", "richkd.tune.arms"} <= set(LAYERS)                # continued lines read too
    undrawn = [m for m in sorted(MODULES) if m != "richkd" and drawn_name(m) is None]
    assert undrawn == [], f"docs/architecture.md's layer drawing does not name {undrawn}"
    ghosts = [name for name in sorted(LAYERS) if name not in MODULES]
    assert ghosts == [], f"docs/architecture.md's layer drawing names modules that do not exist: {ghosts}"


def test_imports_point_down_the_layers():
    upward = []
    for module in sorted(MODULES):
        for target, line in sorted(richkd_imports(module).items()):
            if target == "richkd":                       # the package root (version string) is foundation
                continue
            if layer_of(target) > layer_of(module):
                upward.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {module} "
                              f"({LAYER_NAMES[layer_of(module)]}) imports {target} "
                              f"({LAYER_NAMES[layer_of(target)]})")
    assert upward == [], "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {m: set(richkd_imports(m)) - {"richkd"} for m in MODULES}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("library", ["ray"])
def test_only_the_sweep_layer_imports_ray(library):
    outside = [f"{m}:{line}" for m in sorted(MODULES) if not m.startswith("richkd.tune")
               for target, line in imports_of(m).items() if target == library or target.startswith(library + ".")]
    assert outside == []


def test_the_checker_sees_lazy_and_annotation_only_imports():
    """The walk must catch what it polices: imports inside a function and under TYPE_CHECKING count."""
    source = ("from typing import TYPE_CHECKING\nimport ray.tune\nif TYPE_CHECKING:\n    from richkd.tune.spec import X\n"
              "def f():\n    from richkd.trainer import run_training\n")
    assert imports_in_source(source) == {"typing": 1, "ray.tune": 2, "richkd.tune.spec": 4, "richkd.trainer": 6}
    assert layer_of("richkd.trainer") > layer_of("richkd.schema")
    assert layer_of("richkd.tune.spec") == 4 and layer_of("richkd.cli.sweep") == 5
