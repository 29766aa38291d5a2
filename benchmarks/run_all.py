"""Run every benchmark in one process and (with --update-docs) write the numbers into the docs'
Benchmarks page, docs/benchmarks.md (`make bench`).

The block sits between `<!-- bench:start -->` and `<!-- bench:end -->`; nothing else is touched.
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
PAGE = HERE.parent / "docs" / "benchmarks.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
MODULES = ["bench_core", "bench_reload", "bench_worker", "bench_magics", "bench_lock", "bench_guard", "bench_serve", "bench_profile", "bench_chain"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--update-docs", action="store_true", help=f"write the figures into {PAGE.name}")
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run, never written to the docs")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=MODULES,
                    help="run these (bench_chain ...) and, with --update-docs, replace only their figures")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    blocks = _blocks() if args.only else {}
    for name in MODULES:
        if not (HERE / f"{name}.py").exists() or (args.only and name not in args.only):
            continue
        module = importlib.import_module(name)
        buf = io.StringIO()
        with redirect_stdout(buf):
            module.main(["--quick"] if args.quick else [])
        text = buf.getvalue().rstrip()
        print(f"## {name}\n{text}\n", flush=True)
        blocks[name] = f"`benchmarks/{name}.py`\n```\n{text}\n```"
    if args.update_docs and not args.quick:
        stamp = f"Measured {datetime.date.today()} on {platform.machine()}, Python {platform.python_version()}, {_cpus()} CPUs."
        if args.only:
            stamp += f" ({', '.join(args.only)} measured again alone on that day.)"
        body = "\n".join([START, stamp, "", *(blocks[n] for n in MODULES if n in blocks), END])
        text = PAGE.read_text()
        if START not in text or END not in text:
            sys.exit(f"{PAGE}: no {START} ... {END} block to update")
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        PAGE.write_text(head + body + tail)
        print(f"updated {PAGE}")


def _blocks() -> dict[str, str]:
    """The page's current figures, per benchmark module (what --only leaves as they are)."""
    text = PAGE.read_text()
    if START not in text or END not in text:
        return {}
    inner = text.split(START, 1)[1].split(END, 1)[0]
    out = {}
    for part in inner.split("`benchmarks/")[1:]:
        name = part.split(".py`", 1)[0]
        out[name] = ("`benchmarks/" + part).rstrip()
    return out


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
