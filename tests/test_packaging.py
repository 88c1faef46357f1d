"""The installed package holds every module and data file of the source tree.

The container installs the project with `pip install --no-deps .` (Dockerfile), while every test
here runs an editable install that reads the source tree: a module or data file that package
discovery (`[tool.setuptools.packages.find]`, `package-data`) leaves out of the wheel would fail
only in the image, at its first import.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module_and_asset(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "--wheel-dir", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("nemo_rlsr-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "nemo_rlsr"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    sources = {p for p in tracked if p.endswith((".py", ".jsonl"))}
    assert len(sources) > 50  # the listing worked
    assert sorted(sources - packaged) == []
