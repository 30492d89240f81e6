"""The layers drawn in docs/architecture.md hold: every richkd import points down (or sideways within a layer),
there is no import cycle, and only richkd/tune/ imports Ray. Read from the source with `ast`, so lazy imports
inside functions count too; imports under `if TYPE_CHECKING:` (annotations only) do not."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "richkd"

# Layer of each module, bottom (0) to top; the longest matching prefix decides. Keep in step with
# docs/architecture.md ("Layers").
LAYERS = {
    "richkd": 0, "richkd.schema": 0, "richkd.config": 0, "richkd.io": 0, "richkd.registry": 0, "richkd.device": 0,
    "richkd.provenance": 0, "richkd.metric_names": 0, "richkd.pareto": 0, "richkd.tracking": 0,
    "richkd.models": 1, "richkd.data": 1, "richkd.clip": 1, "richkd.fusion": 1, "richkd.losses": 1,
    "richkd.metrics": 1, "richkd.robustness": 1, "richkd.robustness.corruptions": 1, "richkd.robustness.cifar_c": 1,
    "richkd.robustness.scores": 1,
    "richkd.cache": 2, "richkd.teachers": 2, "richkd.objective": 2, "richkd.analysis": 2,
    "richkd.trainer": 3, "richkd.validate": 3, "richkd.run_outputs": 3, "richkd.robustness.engine": 3,
    "richkd.robustness.val_metrics": 3, "richkd.robustness.evaluate": 3, "richkd.robustness.report": 3,
    "richkd.tune": 4,
    "richkd.cli": 5, "richkd.__main__": 5, "richkd.demo": 5, "richkd.report": 5,
}
LAYER_NAMES = ("foundation", "building blocks", "teaching", "training core", "sweep layer", "applications")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best = max((name for name in LAYERS if module == name or module.startswith(name + ".")), key=len)
    return LAYERS[best]


def _type_checking_nodes(tree: ast.AST) -> set:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imports_of(module: str) -> dict[str, int]:
    """{imported module: line} for every import in `module` (module-level and inside functions)."""
    return imports_in_source(MODULES[module].read_text())


def imports_in_source(source: str) -> dict[str, int]:
    tree = ast.parse(source)
    skipped = _type_checking_nodes(tree)
    out: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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


def test_every_module_has_a_layer():
    assert "richkd.tune.spec" in MODULES and "richkd.trainer" in MODULES      # the walk found the package
    for module in MODULES:
        assert layer_of(module) in range(len(LAYER_NAMES)), module


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


def test_the_checker_sees_lazy_imports_and_skips_annotation_only_ones():
    """The walk must catch what it polices: an import inside a function counts, one under TYPE_CHECKING not."""
    source = ("from typing import TYPE_CHECKING\nimport ray.tune\nif TYPE_CHECKING:\n    from richkd.tune.spec import X\n"
              "def f():\n    from richkd.trainer import run_training\n")
    assert imports_in_source(source) == {"typing": 1, "ray.tune": 2, "richkd.trainer": 6}
    assert layer_of("richkd.trainer") > layer_of("richkd.schema")
    assert layer_of("richkd.tune.spec") == 4 and layer_of("richkd.cli.sweep") == 5
