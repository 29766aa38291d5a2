"""Run every benchmark in one process and (with --update-readme) write the numbers into README.md.

The README block sits between `<!-- bench:start -->` and `<!-- bench:end -->`; nothing else is touched.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import io
import platform
import sys
from contextlib import redirect_stdout
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
MODULES = ["bench_core", "bench_reload", "bench_worker", "bench_magics", "bench_lock", "bench_guard", "bench_serve", "bench_profile", "bench_chain"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run, never written to README")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    blocks = []
    for name in MODULES:
        if not (HERE / f"{name}.py").exists():
            continue
        module = importlib.import_module(name)
        buf = io.StringIO()
        with redirect_stdout(buf):
            module.main(["--quick"] if args.quick else [])
        text = buf.getvalue().rstrip()
        print(f"## {name}\n{text}\n", flush=True)
        blocks.append(f"`benchmarks/{name}.py`\n```\n{text}\n```")
    if args.update_readme and not args.quick:
        stamp = f"Measured {datetime.date.today()} on {platform.machine()}, Python {platform.python_version()}, {_cpus()} CPUs."
        body = "\n".join([START, stamp, "", *blocks, END])
        text = README.read_text()
        if START not in text or END not in text:
            sys.exit(f"{README}: no {START} ... {END} block to update")
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        README.write_text(head + body + tail)
        print(f"updated {README}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
