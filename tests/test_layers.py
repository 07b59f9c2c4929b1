"""The package's layering, read from the source (AST), module- and function-level imports alike.

A module may import only from a lower layer, or from its own layer inside its own package; the
import graph has no cycle; and no import of the package sits inside a function except in
``cli.py`` and ``__init__.py`` (start-up time), each with a comment saying so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "difflora_jax"

# Bottom up. A module's layer is that of its longest listed prefix.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("difflora_jax.errors", "difflora_jax.jit", "difflora_jax.host_memory"),
    ("difflora_jax.config",),
    ("difflora_jax.protocols",),
    ("difflora_jax.catalog",),
    ("difflora_jax.parallel",),  # meshes and sharding rules; knows no model
    ("difflora_jax.modeling",),
    ("difflora_jax.losses",),
    ("difflora_jax.adapter_checkpoint",),
    ("difflora_jax.weights",),
    ("difflora_jax.data",),
    ("difflora_jax.generation",),
    # side by side: evaluation never trains, training never evaluates
    ("difflora_jax.training", "difflora_jax.evaluation"),
    ("difflora_jax.bench",),  # times training and generation
    ("difflora_jax.reproduce",),  # the paper's artifacts: trains and evaluates
    ("difflora_jax.cli", "difflora_jax"),
)
# Local imports allowed only here (start-up time of `import difflora_jax` and `difflora`).
LOCAL_IMPORTS_ALLOWED = ("difflora_jax", "difflora_jax.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS")
    return best


def package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def allowed(module: str, target: str, *, is_package: bool = False) -> bool:
    """Whether ``module`` may import ``target``: a lower layer, or its own package's layer."""
    if target == module or module.startswith(target + "."):
        return True  # itself, or the package it belongs to (its __init__ runs first anyway)
    mine, theirs = layer_of(module), layer_of(target)
    own = package_of(module, is_package)
    return theirs < mine or (theirs == mine and (target == own or target.startswith(own + ".")))


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of the package."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, local) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package_of(module, is_package).split(".")
                    anchor = anchor[: len(anchor) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append((base, child.lineno, local))
                # `from difflora_jax import data` imports the submodule difflora_jax.data
                for alias in child.names:
                    candidate = f"{base}.{alias.name}"
                    if candidate in modules():
                        found.append((candidate, child.lineno, local))
            visit(child, inner)

    visit(tree, False)
    return [(name, line, local) for name, line, local in found if name.startswith("difflora_jax")]


def resolve(name: str, known: dict[str, Path]) -> str:
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for name, _, _ in imports(path, module):
            target = resolve(name, known)
            if target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_import_goes_up_or_sideways():
    known = modules()
    wrong = []
    for module, path in known.items():
        for name, line, _ in imports(path, module):
            if not allowed(module, resolve(name, known), is_package=path.name == "__init__.py"):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_imports_inside_functions_only_for_start_up_time():
    hidden = []
    for module, path in modules().items():
        lines = path.read_text().splitlines()
        for name, line, local in imports(path, module):
            if not local:
                continue
            if module not in LOCAL_IMPORTS_ALLOWED:
                hidden.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
                continue
            context = "\n".join(lines[max(0, line - 5) : line])
            if "start-up time" not in context:
                hidden.append(f"{path.relative_to(PACKAGE.parent)}:{line} (no reason given)")
    assert not hidden, "package imports inside functions:\n" + "\n".join(hidden)


@pytest.mark.parametrize(
    "source, target, ok",
    [
        ("difflora_jax.config", "difflora_jax.training.config", False),
        ("difflora_jax.weights.loading", "difflora_jax.training.step", False),
        ("difflora_jax.weights.export", "difflora_jax.training", False),
        ("difflora_jax.evaluation.heldout", "difflora_jax.training.step", False),
        ("difflora_jax.training.loop", "difflora_jax.evaluation", False),
        ("difflora_jax.modeling.llama", "difflora_jax.modeling.adapters", True),
        ("difflora_jax.weights.loading", "difflora_jax.adapter_checkpoint", True),
        ("difflora_jax.adapter_checkpoint", "difflora_jax.weights.loading", False),
        ("difflora_jax.data.packing", "difflora_jax.losses", True),
        ("difflora_jax.evaluation.heldout", "difflora_jax.generation", True),
    ],
)
def test_the_rule_refuses_what_it_should(source, target, ok):
    """The rule is not vacuous: wrong-way edges of the kind the re-layer removed are refused."""
    assert allowed(source, target) is ok
