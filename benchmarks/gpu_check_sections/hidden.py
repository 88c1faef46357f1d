"""Make installed packages look absent (`gpu_check.py --hide ray,datasets,wandb,mlflow`).

The GPU box has none of Ray, Hugging Face `datasets`, W&B and MLflow; CI has them all (the test
extras). Hiding them in CI makes the smoke run import only what the box can, so an eager
`import ray` on the check's path fails here first. Two things must look absent, as on a machine
without the package: the import (and `importlib.util.find_spec`, which returns None for a `None`
entry of sys.modules), and the distribution's metadata, which sentence-transformers and
transformers read to decide whether to import it at all (`importlib.metadata`).
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-")


def hide_packages(names: list[str]) -> None:
    """From now on, in this process, `import NAME` and its metadata fail as for a missing package."""
    names = [n for n in names if n]
    if not names:
        return
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]
    hidden = {_normalized(n) for n in names}
    from_name = importlib.metadata.Distribution.from_name.__func__

    def hiding_from_name(cls, name: str):
        if _normalized(name) in hidden:
            raise importlib.metadata.PackageNotFoundError(name)
        return from_name(cls, name)

    importlib.metadata.Distribution.from_name = classmethod(hiding_from_name)


def module_command(module: str, args: list[str], hidden: list[str]) -> list[str]:
    """`python -m MODULE ARGS` with `hidden` packages hidden in that process too."""
    if not hidden:
        return [sys.executable, "-m", module, *args]
    here = str(Path(__file__).resolve().parent.parent)
    code = (f"import sys, runpy; sys.path.insert(0, {here!r}); "
            f"from gpu_check_sections.hidden import hide_packages; hide_packages({list(hidden)!r}); "
            f"sys.path.pop(0); sys.argv[0] = {module!r}; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code, *args]
