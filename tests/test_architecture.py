"""The package's shape: one-way layers (import-linter, in `make test`), no import cycles, and
our own imports at module top, where a reader sees what a module depends on.

An import of elfctl written inside a library function usually hides a cycle or a layer in the
wrong place. The command line is exempt: it imports the library inside each command so that
`elfctl --help` does not load torch. So is the package root, whose `load_model`, `generate`
and `load_tokenizer` are looked up on first use for the same reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parent.parent / "elfctl"


def own_imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level or (node.module or "").split(".")[0] == "elfctl"
        ):
            yield node
        elif isinstance(node, ast.Import) and any(
            a.name.split(".")[0] == "elfctl" for a in node.names
        ):
            yield node


def test_library_imports_of_elfctl_sit_at_module_top():
    inside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel == Path("__init__.py"):
            continue
        for node in own_imports(ast.parse(path.read_text())):
            if node.col_offset > 0:
                inside.append(f"{rel}:{node.lineno}")
    assert inside == []


def test_no_module_imports_itself_through_a_cycle():
    graph = grimp.build_graph("elfctl")
    modules = sorted(graph.modules)
    cycles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(imported=module, importer=imported):
                cycles.append((module, imported))
    # A package's face (__init__) re-exports its modules, so face <-> module is not a cycle.
    cycles = [(a, b) for a, b in cycles if not (b.startswith(a + ".") or a.startswith(b + "."))]
    assert cycles == []


def test_every_subpackage_has_a_public_face_with_all():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init.parent.name} has no docstring"
        names = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets]
        if init.parent.name not in ("cli", "testbed"):
            assert "__all__" in names, f"{init.parent.name}/__init__.py has no __all__"
