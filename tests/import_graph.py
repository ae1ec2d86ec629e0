"""Every import statement of a source file, read with ``ast`` (nothing is imported): the one walker
the import-rule tests share (``tests/packaging/test_layering.py``, ``tests/bench/test_public_imports.py``).

Counted: ``import a.b``, ``from a import b`` (relative ones resolved against the file's package),
imports inside functions (the ones that hide cycles), and ``importlib.import_module("a.b")`` /
``__import__("a.b")`` with a constant name.
"""

from __future__ import annotations

import ast
from pathlib import Path


def import_statements(module: str, path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` of every import in ``path`` (the source of ``module``): ``name`` is
    None for ``import module`` and for ``import_module("module")``."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, target, alias.name) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.append((node.lineno, node.args[0].value, None))
    return found
