"""The package's modules depend only on modules below them, and no import forms a cycle.

Layers, bottom to top (a module may import its own layer's modules and those below):
names and paths shared by everyone; the graphs (decoder, layers, C++ kernels); the artifact
folder (file names, checksums, the export config and the checks made at load); checkpoint
weights; the compiler backends and the exporter; the runtime (engine, rank pool, head, token
loop, continuous batching); the integration with optimum-neuron, transformers, the CLI and the
Hub; the server; and the package root, which registers the model. Imports inside functions
count like those at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import optimum_gemma3

PACKAGE = "optimum_gemma3"
ROOT = Path(optimum_gemma3.__file__).parent
LAYERS = [
    {"version", "constants", "paths", "accuracy", "quiet"},
    {"graphs"},
    {"artifact"},
    {"weights"},
    {"compiler"},
    {"runtime"},
    {"integration"},
    {"serve"},
]


def module_names() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, relative imports resolved."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base_parts = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join(base_parts + ([node.module] if node.module else []))
            if base not in modules:
                continue
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in modules else base)
    return found - {name}


def layer_of(name: str) -> int:
    if name == PACKAGE:
        return len(LAYERS)
    top = name.split(".")[1]
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{name} belongs to no layer: add its package to LAYERS")


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_imports_only_its_layer_and_below():
    upward = [
        f"{name} -> {target}"
        for name, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, "imports pointing up:\n" + "\n".join(sorted(upward))


def test_no_module_but_the_root_imports_the_package_root():
    offenders = [name for name, targets in graph().items() if PACKAGE in targets]
    assert not offenders, f"import the package root (use optimum_gemma3.version): {offenders}"


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            # A package's __init__ re-exporting its own modules is not a cycle through them.
            if name != PACKAGE and target.startswith(name + "."):
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
