"""The installed package holds every module and data file of the source tree.

The container installs the project with `pip install --no-deps .` (Dockerfile), while every test
here runs an editable install that reads the source tree: a module or data file that package
discovery (`[tool.setuptools.packages.find]`, `package-data`) leaves out of the wheel would fail
only in the image, at its first import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module_and_asset(tmp_path):
    # Built from a copy of the checkout's files (tracked, and new ones git does not ignore): a build in
    # the checkout itself would reuse a stale nemo_rlsr.egg-info/SOURCES.txt and include what the
    # configuration no longer selects.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    files = [f for f in files if f and (REPO / f).is_file()]
    source = tmp_path / "src"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "--wheel-dir", str(tmp_path / "dist"), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("nemo_rlsr-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    modules = {f for f in files if f.startswith("nemo_rlsr/") and f.endswith((".py", ".jsonl"))}
    assert len(modules) > 50  # the listing worked
    assert sorted(modules - packaged) == []
