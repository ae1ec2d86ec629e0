import sys
from pathlib import Path

# The benchmarks are plain modules in bench/ at the repository root (not an installed package):
# make them importable however pytest is started.
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
