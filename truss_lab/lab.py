"""`make lab`: JupyterLab on the project's example notebooks, bound to 127.0.0.1.

JupyterLab itself prints the URL with its token. Extra arguments pass through to `jupyter lab`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def lab_command(notebooks: Path, extra: list[str]) -> list[str]:
    root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # containers run as root
    return [
        sys.executable, "-m", "jupyterlab",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.root_dir={notebooks}",
        "--no-browser",
        *root,
        *extra,
    ]


def main(argv: list[str] | None = None) -> None:
    notebooks = PROJECT / "notebooks"
    if not notebooks.is_dir():
        sys.exit(f"{notebooks}: no notebooks folder (run `make lab` from a clone of truss_lab)")
    cmd = lab_command(notebooks, list(sys.argv[1:] if argv is None else argv))
    print("starting:", " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
