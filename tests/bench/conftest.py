"""`bench` is a top-level folder of the repo, not part of the installed package: put the repo root first on the path,
so that `import bench` finds it (and not this tests/bench folder) however pytest is started."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
