"""A chain's trusses, as Truss's own code generation writes them for a push (generate only: nothing
leaves the machine): one truss per chainlet, its generated `TrussChainletModel`, stubs and pydantic I/O."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

from .errors import TrussLabError


@dataclasses.dataclass
class _Generated:
    """What Truss's code generation wrote for one version of the chain's source."""

    name: str
    order: list[str]  # dependencies first, the entrypoint last
    depends: dict[str, tuple[str, ...]]  # chainlet -> the chainlets it calls
    folders: dict[str, Path]  # chainlet -> its generated truss
    classes: dict[str, tuple[str, str]]  # chainlet -> (module, class name) in the chain root


def _generate(source: Path, entrypoint: str | None, root: Path) -> _Generated:
    """Import the chain's source and write every chainlet's truss under `root` as a push does (generate
    only). A file truss_chains refuses is one TrussLabError line naming it."""
    from truss_chains import framework, private_types
    from truss_chains.deployment import deployment_client

    loaded: dict[str, Any] = {}
    try:
        with _generating(root), framework.ChainletImporter.import_target(source, entrypoint) as entry:
            name = entry.name
            descriptors = list(deployment_client._get_ordered_dependencies([entry]))
            options = private_types.PushOptionsLocalDocker(chain_name=name, only_generate_trusses=True, use_local_src=False)
            deployment_client.push(entry, options)
            loaded = dict(sys.modules)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:  # ChainsUsageError is a TypeError
        raise TrussLabError(f"{source}: {' '.join(str(exc).split())}") from None
    finally:
        _keep_libraries(loaded, source.parent)
    generated = root / private_types.GENERATED_CODE_DIR
    folders = {p.name.removeprefix("chainlet_"): p for p in generated.glob(f"{name}/chainlet_*")}
    for display, folder in folders.items():  # a push suffixes each model name with a random id: here the name is enough
        config = folder / "config.yaml"
        text = config.read_text()
        config.write_text("\n".join(f"model_name: {display}" if line.startswith("model_name:") else line
                                    for line in text.splitlines()) + "\n")
    order = [d.display_name for d in descriptors]
    examples = examples_file(source)
    if examples.is_file():  # the entrypoint's truss gets the chain's examples (the panel, %truss predict --example)
        shutil.copyfile(examples, folders[order[-1]] / "examples.yaml")
    return _Generated(
        name=name,
        order=order,
        depends={d.display_name: tuple(sorted(dep.display_name for dep in d.dependencies.values())) for d in descriptors},
        folders=folders,
        classes={d.display_name: (d.chainlet_cls.__module__, d.chainlet_cls.__name__) for d in descriptors},
    )


def examples_file(source: Path) -> Path:
    """The chain's examples: `<source stem>.examples.yaml` next to it, else `examples.yaml` in its folder
    (a list of {name, input}, as a truss's examples.yaml; each input is the entrypoint's JSON body)."""
    own = source.with_name(f"{source.stem}.examples.yaml")
    return own if own.is_file() or not (source.parent / "examples.yaml").is_file() else source.parent / "examples.yaml"


def _keep_libraries(loaded: dict[str, Any], chain_root: Path) -> None:
    """truss_chains drops from sys.modules every module the chain source's import brought in, libraries
    included (it keeps torch only); numpy, TensorFlow and others cannot be imported twice in a process.
    Put back all but the chain's own files."""
    root = str(chain_root) + os.sep
    for name, module in loaded.items():
        if name in sys.modules:
            continue
        path = getattr(module, "__file__", None) or ""
        if not path.startswith(root):
            sys.modules[name] = module


_generation = threading.Lock()  # tempfile.tempdir and PATH are the process's: one generation at a time


@contextlib.contextmanager
def _generating(root: Path):
    """Truss's code generation writes under tempfile.gettempdir() and formats with `ruff`: our folder,
    and this interpreter's scripts on PATH."""
    with _generation, _swapped(root), warnings.catch_warnings():
        # truss's ignore-file matching uses a pathspec API pathspec deprecates: 320 warnings per generation
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pathspec(\.|$)")
        yield


@contextlib.contextmanager
def _swapped(root: Path):
    old_tempdir, old_path = tempfile.tempdir, os.environ.get("PATH", "")
    tempfile.tempdir = str(root)
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), old_path])
    try:
        yield
    finally:
        tempfile.tempdir = old_tempdir
        os.environ["PATH"] = old_path
