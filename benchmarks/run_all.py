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
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=MODULES,
                    help="run these (bench_chain ...) and, with --update-readme, replace only their figures")
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
    if args.update_readme and not args.quick:
        stamp = f"Measured {datetime.date.today()} on {platform.machine()}, Python {platform.python_version()}, {_cpus()} CPUs."
        if args.only:
            stamp += f" ({', '.join(args.only)} measured again alone on that day.)"
        body = "\n".join([START, stamp, "", *(blocks[n] for n in MODULES if n in blocks), END])
        text = README.read_text()
        if START not in text or END not in text:
            sys.exit(f"{README}: no {START} ... {END} block to update")
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        README.write_text(head + body + tail)
        print(f"updated {README}")


def _blocks() -> dict[str, str]:
    """The README's current figures, per benchmark module (what --only leaves as they are)."""
    text = README.read_text()
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
