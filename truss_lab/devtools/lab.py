"""`make lab`: JupyterLab on the project's example notebooks, bound to 127.0.0.1, the example truss preloaded.

Every kernel this JupyterLab starts has `digits` (examples/digits, a LiveModel watching for edits, in a
worker process: the kernel itself stays free for the truss you load)
in its namespace, through an IPython profile under `.lab/` (not your own ~/.ipython); JupyterLab's
settings there turn off its news prompt, so the lab opens with nothing to dismiss. The notebooks
load what they need themselves, so they also run in any other Jupyter. JupyterLab prints the URL
with its token. Extra arguments pass through to `jupyter lab`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
PRELOAD = "digits"  # the variable every kernel starts with
EXAMPLE = PROJECT / "examples" / "digits"

KERNEL_CONFIG = """\
# Written by `make lab` (truss_lab/devtools/lab.py): the example truss, loaded in every kernel of that JupyterLab.
c = get_config()  # noqa: F821
c.InteractiveShellApp.exec_lines = [
    "import truss_lab as _truss_lab",
    "{var} = _truss_lab.load({path!r}, process='worker')  # this kernel stays free for the truss you load",
    "{var}.watch()",
    "del _truss_lab",
]
"""


def write_profile(ipython_dir: Path, example: Path = EXAMPLE, var: str = PRELOAD) -> Path:
    """An IPython profile whose kernels start with `var` = the example truss, loaded and watched."""
    config = ipython_dir / "profile_default" / "ipython_kernel_config.py"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(KERNEL_CONFIG.format(var=var, path=str(example)))
    return config


# JupyterLab's own settings for this lab: no "get notified about official Jupyter news?" prompt on the
# first start (and no update check: it would go to the network), so it opens on the notebooks.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


def write_lab_settings(settings_dir: Path) -> Path:
    """JupyterLab user settings (JUPYTERLAB_SETTINGS_DIR) that open the lab with nothing to dismiss."""
    import json

    for rel, value in LAB_SETTINGS.items():
        path = settings_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2))
    return settings_dir


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


def lab_environment(ipython_dir: Path, settings_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, IPYTHONDIR=str(ipython_dir))
    if settings_dir is not None:
        env.setdefault("JUPYTERLAB_SETTINGS_DIR", str(write_lab_settings(settings_dir)))  # a settings dir of your own wins
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter stays out of the cells
    # oneDNN's reordered float sums: off, as in the tests, so the notebooks show the numbers their
    # saved outputs and the examples' snapshots have (and TensorFlow logs no oneDNN notice through absl)
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    return env


def main(argv: list[str] | None = None) -> None:
    notebooks = PROJECT / "notebooks"
    if not notebooks.is_dir():
        sys.exit(f"{notebooks}: no notebooks folder (run `make lab` from a clone of truss_lab)")
    ipython_dir = PROJECT / ".lab" / "ipython"
    write_profile(ipython_dir)
    cmd = lab_command(notebooks, list(sys.argv[1:] if argv is None else argv))
    print(f"every kernel starts with `{PRELOAD}` = truss_lab.load({str(EXAMPLE)!r}), watching for edits")
    print("starting:", " ".join(cmd), flush=True)
    os.execve(sys.executable, cmd, lab_environment(ipython_dir, PROJECT / ".lab" / "settings"))


if __name__ == "__main__":
    main()
