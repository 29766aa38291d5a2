"""Run a command while busy processes load every core: `make test-under-load` runs the timing-sensitive
tests and notebook 03 this way, so what they assert must hold on a machine that is not idle (CI shares
its machine).

    python -m truss_lab.devtools.under_load [--busy N] -- COMMAND ...
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys


def _spin() -> None:
    x = 0
    while True:  # pure CPU: holds one core until terminated
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes (default: one per core)")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    print(f"under load: {args.busy} busy processes on {os.cpu_count()} cores while running: {' '.join(command)}", flush=True)
    try:
        return subprocess.call(command)
    finally:
        for p in busy:
            p.terminate()
        for p in busy:
            p.join(5)


if __name__ == "__main__":
    sys.exit(main())
