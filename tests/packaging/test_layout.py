"""One distribution, one namespace: the top-level folders ship as flashmem.* and nothing else."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("flashmem-*.whl")
    return zipfile.ZipFile(path).namelist()


def test_wheel_maps_folders_into_one_namespace(wheel):
    tops = {name.split("/")[0] for name in wheel if not name.startswith("flashmem-")}
    assert tops == {"flashmem"}
    for module in (
        "flashmem/kernels/paged_decode.py",
        "flashmem/offload/block_pool.py",
        "flashmem/indexer/lookahead.py",
        "flashmem/cli.py",
    ):
        assert module in wheel


def test_wheel_ships_the_default_model_data(wheel):
    assert "flashmem/offload/data/triattention_default_model.safetensors" in wheel
    assert "flashmem/indexer/data/smollm2_135m_lookahead.safetensors" in wheel
    assert "flashmem/indexer/data/smollm2_135m_lookahead.json" in wheel


def test_installed_subpackages_resolve_to_the_repository_folders():
    import flashmem.indexer
    import flashmem.kernels
    import flashmem.offload

    assert Path(flashmem.kernels.__file__).parent.name == "flashmem_kernels"
    assert Path(flashmem.offload.__file__).parent.name == "offload"
    assert Path(flashmem.indexer.__file__).parent.name == "indexer"


def test_no_top_level_folder_hides_an_installed_module():
    """A command run from the repository root has the root on ``sys.path``: a package folder there
    named like an installed distribution's module (a ``kernels/`` beside the PyPI ``kernels`` that
    transformers imports) would be imported in its place."""
    from importlib.metadata import packages_distributions

    installed = packages_distributions()
    ours = {"flashmem"}  # the editable install maps it onto its own folder
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    clashes = {name: installed[name] for name in folders - ours if name in installed}
    assert clashes == {}, f"repository folders hide installed modules: {clashes}"
