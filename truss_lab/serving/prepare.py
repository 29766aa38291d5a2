"""Install before a test run (or a workshop) what `truss-lab check` of some trusses and chains would
install on first use: the real Truss server's venvs and every requirements overlay (a chain: one per
chainlet). `make test` runs it on `examples/` before pytest, whose processes are offline.

    python -m truss_lab.serving.prepare examples            # or trusses, chain sources, folders of them
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable

from ..bundle import read_bundle
from ..errors import TrussLabError
from .check import chainlet_requirements
from .lints import requirements_of
from .truss_server import ServerEnv


def requirement_sets(paths: Iterable[str | os.PathLike]) -> list[list[str]]:
    """The requirements overlays `check` of these trusses and chains installs (a chain: one per
    chainlet). A folder stands for the trusses in it (folders with a config.yaml) and its chains
    (`*_chain.py`) and single-file models (`*_model.py`), as `make check-examples` finds them."""
    import tempfile

    trusses: list[Path] = []
    chains: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "config.yaml").is_file():
            trusses.append(path)
        elif path.suffix == ".py" and path.is_file():
            chains.append(path)
        elif path.is_dir():
            trusses += sorted(p.parent for p in path.glob("*/config.yaml"))
            chains += sorted(path.glob("*/*_chain.py")) + sorted(path.glob("*/*_model.py"))  # chains, single-file models
        else:
            raise TrussLabError(f"{path}: not a truss folder, a chain source or a folder of them")
    sets = [requirements_of(read_bundle(t)) for t in trusses]
    if chains:
        from ..chain_gen import _generate

        for source in chains:
            with tempfile.TemporaryDirectory(prefix="truss-lab-prepare-") as scratch:
                generated = _generate(source.resolve(), None, Path(scratch))
                sets += [chainlet_requirements(read_bundle(folder)) for folder in generated.folders.values()]
    return sets


def prepare(paths: Iterable[str | os.PathLike], note: Callable[[str], None] | None = None) -> int:
    """Install now what `check` of these trusses and chains would install: the Truss server's environment
    and every requirements overlay - the set-up step, so that a check later (a test run, a notebook)
    needs no network. Returns the number of overlays ready."""
    env = ServerEnv.ensure(note=note)
    return sum(env.requirements_overlay(reqs, note=note) is not None for reqs in requirement_sets(paths))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m truss_lab.serving.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="trusses, chain sources, or folders of them")
    args = parser.parse_args(argv)
    try:
        ready = prepare(args.paths)
    except TrussLabError as exc:
        sys.exit(f"truss_lab: {exc}")
    print(f"Truss server ready; {ready} requirements overlays ready for {', '.join(args.paths)}")


if __name__ == "__main__":
    main()
