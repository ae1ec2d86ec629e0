"""The benchmarks use flashmem the way a user does: only the public names of ``flashmem``,
``flashmem.offload``, ``flashmem.indexer`` and ``flashmem.kernels`` (their ``__all__``) and the
modules ``flashmem.testing`` and ``flashmem.prompts``; their random-init models come from
``flashmem.testing`` (no model class or config of their own). Inside bench/, imports form no cycle,
the README renderer (``bench/readme.py``) is reached from ``bench/run.py`` only, and the kvpress
worker, which runs in kvpress's own environment, reaches nothing but the standard library, torch,
transformers, kvpress and bench modules that do the same.

Every import counts (``tests/import_graph.py``: absolute, relative, inside functions,
``importlib.import_module("...")`` / ``__import__("...")`` with a constant name), and attribute chains on an imported flashmem module
(``flashmem.hf_compat.forward_kwargs``). The checker reads source files; it imports nothing of bench.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from import_graph import import_statements

ROOT = Path(__file__).resolve().parents[2]
# modules whose public names are their __all__
PUBLIC = ("flashmem", "flashmem.offload", "flashmem.indexer", "flashmem.kernels")
# modules that are public as a whole (any name without a leading underscore)
OPEN = ("flashmem.testing", "flashmem.prompts")
# transformers names that build a model: bench takes its models from flashmem.testing / flashmem.load_model
MODEL_SUFFIXES = ("ForCausalLM", "Config", "Model")
# modules that run in another environment (no flashmem there): they load their model themselves
OWN_ENVIRONMENT = ("bench.peers.kvpress_worker",)
OWN_ENVIRONMENT_PACKAGES = {"torch", "transformers", "kvpress", "bench"}
# the README renderer and the one module that may import it (the CLI's ``report`` command)
README_RENDERER, CLI = "bench.readme", "bench.run"


def public_names() -> dict[str, set[str]]:
    return {m: set(importlib.import_module(m).__all__) for m in PUBLIC}


def bench_modules(root: Path) -> dict[str, Path]:
    """``bench.x.y`` -> path of every module under ``root/bench``."""
    out = {}
    for path in sorted((root / "bench").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _flashmem_aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound to a flashmem module by ``import flashmem[.x] [as y]``."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "flashmem":
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases["flashmem"] = "flashmem"
    return aliases


def _name_problem(module: str, name: str, public: dict[str, set[str]]) -> str | None:
    """Why ``module.name`` is not public, or None."""
    if f"{module}.{name}" in (*PUBLIC, *OPEN):
        return None
    if module in public:
        return None if name in public[module] else f"{module}.{name} is not in {module}.__all__"
    if module in OPEN:
        return None if not name.startswith("_") else f"{module}.{name} is private"
    return f"{module} is not a public flashmem module"


def check_bench_imports(root: Path, public: dict[str, set[str]]) -> list[str]:
    """Every non-public flashmem import and every model built by hand in ``root/bench``, one line each."""
    problems = []
    for module, path in bench_modules(root).items():
        rel = path.relative_to(root)
        for line, target, name in import_statements(module, path):
            where = f"{rel}:{line}"
            if target.split(".")[0] == "flashmem":
                if name is None:
                    why = None if target in (*PUBLIC, *OPEN) else f"{target} is not a public flashmem module"
                else:
                    why = _name_problem(target, name, public)
                if why:
                    problems.append(f"{where}: non-public flashmem import: {why}")
            elif (
                target.split(".")[0] == "transformers"
                and name
                and name.endswith(MODEL_SUFFIXES)
                and module not in OWN_ENVIRONMENT
            ):
                problems.append(
                    f"{where}: builds its own model (transformers.{name}): use flashmem.testing.tiny_model"
                )
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = _flashmem_aliases(tree)
        for node in ast.walk(tree):
            # flashmem.a.b: the outermost chain whose root is a flashmem alias
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in aliases:
                continue
            current = aliases[base.id]
            for attr in reversed(chain):
                if f"{current}.{attr}" in (*PUBLIC, *OPEN):
                    current = f"{current}.{attr}"
                    continue
                why = None if attr == "__version__" else _name_problem(current, attr, public)
                if why:
                    problems.append(f"{rel}:{node.lineno}: non-public flashmem attribute: {why}")
                break
    return sorted(set(problems))


def bench_graph(root: Path) -> dict[str, set[str]]:
    """bench module -> the bench modules it imports (anywhere in its file)."""
    modules = bench_modules(root)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for _, target, name in import_statements(module, path):
            for candidate in (f"{target}.{name}" if name else None, target):
                if candidate in modules:
                    targets.add(candidate)
                    break
        graph[module] = targets - {module}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), list(graph.get(start, ()))
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(graph.get(node, ()))
    return seen


def check_bench_layout(root: Path) -> list[str]:
    """Import cycles among the bench modules; who reaches the README renderer; what the
    own-environment modules reach."""
    modules = bench_modules(root)
    graph = bench_graph(root)
    problems = [f"import cycle through {m}" for m in sorted(graph) if m in reachable(graph, m)]
    for module in sorted(graph):
        if module not in (README_RENDERER, CLI) and README_RENDERER in reachable(graph, module):
            problems.append(f"{module} reaches the README renderer {README_RENDERER}")
    for worker in OWN_ENVIRONMENT:
        if worker not in modules:
            continue
        for module in sorted({worker} | reachable(graph, worker)):
            for line, target, _ in import_statements(module, modules[module]):
                top = target.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN_ENVIRONMENT_PACKAGES:
                    problems.append(
                        f"{worker} runs in its own environment, but {module}:{line} imports {target}"
                    )
    return problems


# ---------------------------------------------------------------------------------------------
def test_bench_imports_only_public_flashmem_names():
    assert check_bench_imports(ROOT, public_names()) == []
    assert check_bench_layout(ROOT) == []


def test_the_public_names_exist():
    for module, names in public_names().items():
        mod = importlib.import_module(module)
        assert names and all(hasattr(mod, n) for n in names), module
    for module in OPEN:
        importlib.import_module(module)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


PUBLIC_SAMPLE = {
    "flashmem": {"wrap", "FlashMemConfig"},
    "flashmem.offload": {"BlockPool"},
    "flashmem.indexer": set(),
    "flashmem.kernels": {"compaction"},
}


def test_checker_fails_on_a_synthetic_module(tmp_path):
    good = (
        "import flashmem\nimport flashmem.offload\nfrom flashmem import wrap, testing\n"
        "from flashmem.offload import BlockPool\nfrom flashmem.testing import tiny_model\n"
        "from flashmem.prompts import passkey_prompt\nfrom . import common\n"
        "def f():\n    return flashmem.FlashMemConfig, flashmem.offload.BlockPool, flashmem.__version__\n"
    )
    root = _tree(tmp_path, {"bench/__init__.py": "", "bench/common.py": "", "bench/good.py": good})
    assert check_bench_imports(root, PUBLIC_SAMPLE) == []

    bad = (
        "from flashmem.hf_compat import forward_kwargs\n"  # a module that is not public
        "from flashmem.models import _pin_special_tokens\n"
        "import flashmem.offload.block_pool\n"  # a submodule of a public package
        "from flashmem.kernels import compaction, reference_compaction\n"  # a name outside __all__
        "from flashmem.testing import _private\n"
        "def f():\n"
        "    from flashmem import load_secret\n"  # function-level
        "    import flashmem\n"
        "    import importlib\n"
        "    importlib.import_module('flashmem.cache')\n"
        "    return flashmem.hf_compat.forward_kwargs, flashmem.offload.block_pool.BlockPool\n"
        "def g():\n"
        "    from transformers import LlamaConfig, LlamaForCausalLM, DynamicCache\n"
    )
    root = _tree(tmp_path, {"bench/peers/__init__.py": "", "bench/peers/bad.py": bad})
    problems = check_bench_imports(root, PUBLIC_SAMPLE)
    text = "\n".join(problems)
    for expected in (
        "bad.py:1: non-public flashmem import: flashmem.hf_compat is not a public flashmem module",
        "bad.py:2: non-public flashmem import: flashmem.models is not a public flashmem module",
        "bad.py:3: non-public flashmem import: flashmem.offload.block_pool is not a public flashmem module",
        "bad.py:4: non-public flashmem import: flashmem.kernels.reference_compaction is not in",
        "bad.py:5: non-public flashmem import: flashmem.testing._private is private",
        "bad.py:7: non-public flashmem import: flashmem.load_secret is not in flashmem.__all__",
        "bad.py:10: non-public flashmem import: flashmem.cache is not a public flashmem module",
        "bad.py:11: non-public flashmem attribute: flashmem.hf_compat is not in flashmem.__all__",
        "bad.py:11: non-public flashmem attribute: flashmem.offload.block_pool is not in",
        "bad.py:13: builds its own model (transformers.LlamaConfig)",
        "bad.py:13: builds its own model (transformers.LlamaForCausalLM)",
    ):
        assert expected in text, f"{expected!r} not reported in:\n{text}"
    assert "DynamicCache" not in text and "good.py" not in text
    assert len(problems) == 11


def test_layout_check_fails_on_a_synthetic_cycle(tmp_path):
    root = _tree(
        tmp_path,
        {
            "bench/__init__.py": "",
            "bench/entry.py": "def main():\n    from bench.peers import peer\n",  # function-level
            "bench/peers/__init__.py": "",
            "bench/peers/peer.py": "from ..entry import main\n",  # relative
            "bench/shared.py": "",
            "bench/other.py": "from bench import shared\n",
        },
    )
    assert check_bench_layout(root) == [
        "import cycle through bench.entry",
        "import cycle through bench.peers.peer",
    ]
    (root / "bench/peers/peer.py").write_text("from .. import shared\n")
    assert check_bench_layout(root) == []


def test_layout_check_fails_when_the_worker_reaches_flashmem(tmp_path):
    root = _tree(
        tmp_path,
        {
            "bench/__init__.py": "",
            "bench/metrics.py": "import re\nimport torch\n",
            "bench/common.py": "import json\n\ndef f():\n    import flashmem\n",
            "bench/peers/__init__.py": "",
            "bench/peers/kvpress_worker.py": "import json\nfrom bench.metrics import x\n"
            "def w():\n    import kvpress\n    from transformers import DynamicCache\n",
        },
    )
    assert check_bench_layout(root) == []
    (root / "bench/metrics.py").write_text("import torch\nfrom bench import common\n")
    assert check_bench_layout(root) == [
        "bench.peers.kvpress_worker runs in its own environment, but bench.common:4 imports flashmem"
    ]


def test_layout_check_fails_when_an_entry_reaches_the_readme_renderer(tmp_path):
    root = _tree(
        tmp_path,
        {
            "bench/__init__.py": "",
            "bench/readme.py": "import json\n",
            "bench/run.py": "def main():\n    from bench import readme\n",  # the CLI may
            "bench/shared.py": "",
            "bench/entry.py": "from bench import shared\n",
        },
    )
    assert check_bench_layout(root) == []
    (root / "bench/shared.py").write_text("def f():\n    from .readme import render\n")
    assert check_bench_layout(root) == [
        "bench.entry reaches the README renderer bench.readme",  # through bench.shared
        "bench.shared reaches the README renderer bench.readme",
    ]
