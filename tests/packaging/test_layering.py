"""Imports run one way (docs/architecture.md): ``kernels`` (folder ``flashmem_kernels/``) imports
nothing of ours; ``offload`` and ``indexer`` import only ``kernels`` and themselves; ``flashmem/``
joins them. No import cycle, and no inference module reaches set-up code (calibration, record
extraction, training).

Every import counts (``tests/import_graph.py``: absolute, relative, inside functions, and
``importlib.import_module`` with a constant name). The checker reads source files; it imports nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import import_statements

ROOT = Path(__file__).resolve().parents[2]
# folder -> import name (pyproject.toml's package-dir)
PACKAGES = {
    "flashmem": "flashmem",
    "flashmem_kernels": "flashmem.kernels",
    "offload": "flashmem.offload",
    "indexer": "flashmem.indexer",
}
# layer -> the layers it may import
ALLOWED = {
    "kernels": {"kernels"},
    "offload": {"kernels", "offload"},
    "indexer": {"kernels", "indexer"},
    "flashmem": {"kernels", "offload", "indexer", "flashmem"},
}
INFERENCE = (
    "flashmem.wrapper",
    "flashmem.cache",
    "flashmem.recall",
    "flashmem.hf_compat",
    "flashmem.config",
    "flashmem.files",
    "flashmem.models",
)
SETUP = (
    "flashmem.calibration",
    "flashmem.indexer_data",
    "flashmem.indexer_training",
    "flashmem.indexer.train",
)


def _modules(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    out = {}
    for folder, name in packages.items():
        for path in sorted((root / folder).glob("*.py")):
            out[name if path.stem == "__init__" else f"{name}.{path.stem}"] = path
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("kernels", "offload", "indexer") else "flashmem"


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """flashmem modules ``module`` imports anywhere in its file (resolved to known modules)."""
    found = set()
    for _, target, name in import_statements(module, path):
        name = f"{target}.{name}" if name else target
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def check_layering(root: Path, packages: dict[str, str] = PACKAGES) -> list[str]:
    """Every violation of the import rules in the tree at ``root``, one line each."""
    modules = _modules(root, packages)
    known = set(modules)
    graph = {m: _imports(m, p, known) for m, p in modules.items()}
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _layer(target) not in ALLOWED[_layer(module)]:
                problems.append(f"upward import: {module} imports {target}")
    # cycles: any module that can reach itself
    for start in sorted(graph):
        stack, seen = list(graph[start]), set()
        while stack:
            node = stack.pop()
            if node == start:
                problems.append(f"import cycle through {start}")
                break
            if node not in seen:
                seen.add(node)
                stack.extend(graph.get(node, ()))
    for start in INFERENCE:
        if start not in graph:
            continue
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            stack.extend(graph.get(node, ()))
        for bad in sorted(seen & set(SETUP)):
            problems.append(f"inference module {start} reaches set-up code {bad}")
    return problems


def test_repository_follows_the_import_rules():
    assert check_layering(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for folder in PACKAGES:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "files, expected",
    [
        # an offload module reaching up into flashmem/, inside a function
        (
            {
                "offload/bad.py": "def f():\n    from flashmem.hf_compat import rotate\n",
                "flashmem/hf_compat.py": "",
            },
            "upward import: flashmem.offload.bad imports flashmem.hf_compat",
        ),
        # a relative import from indexer into flashmem/ (``..models``)
        (
            {"indexer/bad.py": "from ..models import load_model\n", "flashmem/models.py": ""},
            "upward import: flashmem.indexer.bad imports flashmem.models",
        ),
        # an import by name (importlib), which a walker of import statements alone would miss
        (
            {
                "indexer/dyn.py": "import importlib\ndef f():\n    importlib.import_module('flashmem.offload.x')\n",
                "offload/x.py": "",
            },
            "upward import: flashmem.indexer.dyn imports flashmem.offload.x",
        ),
        # kernels importing offload
        (
            {"flashmem_kernels/k.py": "import flashmem.offload.x\n", "offload/x.py": ""},
            "upward import: flashmem.kernels.k imports flashmem.offload.x",
        ),
        # a cycle hidden in function-level imports
        (
            {
                "indexer/a.py": "def f():\n    from .b import g\n",
                "indexer/b.py": "def g():\n    from .a import f\n",
            },
            "import cycle through flashmem.indexer.a",
        ),
        # the inference path reaching training code
        (
            {"flashmem/recall.py": "from .indexer.train import fit\n", "indexer/train.py": ""},
            "inference module flashmem.recall reaches set-up code flashmem.indexer.train",
        ),
    ],
)
def test_checker_catches_synthetic_violations(tmp_path, files, expected):
    problems = check_layering(_tree(tmp_path, files))
    assert expected in problems, problems


def test_checker_accepts_a_clean_synthetic_tree(tmp_path):
    tree = _tree(
        tmp_path,
        {
            "flashmem_kernels/k.py": "import torch\n",
            "offload/o.py": "from ..kernels.k import x\nfrom .p import y\n",
            "offload/p.py": "",
            "indexer/i.py": "from flashmem.kernels import k\n",
            "flashmem/w.py": "from flashmem.offload.o import z\nfrom .indexer.i import q\n",
        },
    )
    assert check_layering(tree) == []
