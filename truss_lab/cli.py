"""`truss-lab` on the command line. Exit codes: 0 ok, 1 model error, 2 usage or bundle error."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_MODEL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def parse_input(text: str) -> Any:
    """`--input`: JSON text, or @FILE: a JSON file, or any other file's raw bytes (an image, say)."""
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"--input {text}: cannot read {path}: {exc.strerror}") from None
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if path.suffix.lower() == ".json":
                raise UsageError(f"--input {text}: {path} is not valid JSON") from None
            return data
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--input: not valid JSON ({exc.msg} at column {exc.colno}); quote strings: --input '\"text\"'"
        ) from None


def _inputs(args, live) -> list[Any]:
    if args.input is not None and args.example is not None:
        raise UsageError("give --input or --example, not both")
    if args.input is not None:
        return [parse_input(args.input)]
    if args.example is not None:
        return [live.example(args.example)]
    if live.examples:
        return list(live.examples.values())
    raise UsageError(f"{live.path}: no --input given and no examples in {live.bundle.examples_filename}")


def _json(value: Any) -> str:
    from .display.text import json_fallback, short

    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=json_fallback)
    except (TypeError, ValueError, RecursionError):  # a cycle, say: a bounded one-line form instead
        return short(value)


def cmd_init(args) -> int:
    from .scaffold import init

    path = init(args.path, name=args.name, python_config=args.python_config)
    print(f"wrote a new Truss at {path}")
    return EXIT_OK


@contextlib.contextmanager
def _opened(path: str, lock: int | None):
    """(the LiveModel requests go to, the chain it is the entrypoint of or None): a truss folder, or a
    Truss Chain's source (its entrypoint answers, as deployed)."""
    if path.endswith(".py") and Path(path).is_file():
        from .chains import load_chain

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chain = load_chain(path)
        with chain:
            if lock is not None:
                chain.entry.concurrency = lock
            yield chain.entry, chain
        return
    from .live import load

    with load(path, concurrency=lock) as live:
        yield live, None


def cmd_predict(args) -> int:
    from .display.text import timing_table

    with _opened(args.path, args.lock) as (live, chain):
        model_input = _inputs(args, live)[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = live.run(model_input)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        if result.error is not None:
            print(f"error: {result.error}", file=sys.stderr)
            print(timing_table(result.trace), file=sys.stderr)
            return EXIT_MODEL
        print(_json(result.output))
        print(f"timing (v{result.trace.version}):\n{timing_table(result.trace)}", file=sys.stderr)
        if chain is not None:
            print("\n".join(["request tree:", *chain.trees()[-1].lines("  ")]), file=sys.stderr)
    return EXIT_OK


def cmd_bench(args) -> int:
    with _opened(args.path, args.lock) as (live, chain):
        inputs = _inputs(args, live)
        report = live.bench(inputs, n=args.n, concurrency=args.concurrency, progress=not args.no_progress)
        print(report.table())
        if chain is not None:  # where the time went, chainlet by chainlet
            print(chain.report(last=args.n).table())
        return EXIT_MODEL if report.failures else EXIT_OK


def cmd_profile(args) -> int:
    with _opened(args.path, args.lock) as (live, _):  # a chain: its entrypoint's stages, as `%truss profile`
        inputs = _inputs(args, live)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            profile = live.profile(inputs[0], n=args.n)
        print(profile.text(n=args.top))
        if args.chrome_trace:
            live.report(last=args.n).to_chrome_trace(args.chrome_trace, profile=profile)
            print(f"chrome trace: {args.chrome_trace} (open it in https://ui.perfetto.dev or chrome://tracing)", file=sys.stderr)
        return EXIT_MODEL if any(not t.ok for t in profile.traces) else EXIT_OK


def cmd_serve(args) -> int:
    max_body = int(args.max_body_mb * 1024 * 1024)
    if args.ray:
        try:
            from .serving.ray_serve import serve_forever
        except ImportError as exc:
            print(f"truss-lab serve --ray needs Ray Serve: pip install 'truss_lab[ray]' ({exc})", file=sys.stderr)
            return EXIT_USAGE

        serve_forever(args.path, host=args.host, port=args.port, num_replicas=args.replicas,
                      stage_replicas=args.stage_replicas, num_gpus=args.gpus, max_body=max_body)
        return EXIT_OK
    if args.path.endswith(".py") and Path(args.path).is_file():  # a Truss Chain: its entrypoint, as deployed
        from .chains import load_chain

        with load_chain(args.path) as chain:
            if not args.no_watch:
                chain.watch()  # a save reloads the chainlets whose code changed
                chain.on_reload(lambda event: print(event.summary(), flush=True))
            server = chain.serve(host=args.host, port=args.port, max_body=max_body)
            print(f"serving the chain {chain.name} ({', '.join(chain.chainlets)}) at {server.url}/v1/models/model:predict "
                  "(Ctrl-C stops)", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
        return EXIT_OK
    try:
        from .serving.server import serve_path
    except ImportError as exc:
        print(f"truss-lab serve needs FastAPI and uvicorn: pip install 'truss_lab[serve]' ({exc})", file=sys.stderr)
        return EXIT_USAGE
    from .live import LiveModel

    try:
        serve_path(args.path, LiveModel, host=args.host, port=args.port, max_body=max_body, watch=not args.no_watch)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_snapshot(args) -> int:
    from .examples import write_snapshot
    from .live import load

    with load(args.path) as live:
        if not live.bundle.examples:
            print(f"truss-lab snapshot: {live.bundle.examples_path}: no examples to snapshot", file=sys.stderr)
            return EXIT_USAGE
        path = write_snapshot(live)
    print(f"wrote {path} ({len(live.bundle.examples)} examples)")
    return EXIT_OK


def cmd_test(args) -> int:
    from .examples import test_snapshot, write_snapshot
    from .live import load

    with load(args.path) as live:
        if args.update:
            print(f"updated {write_snapshot(live)}")
            return EXIT_OK
        result = test_snapshot(live, rtol=args.rtol, atol=args.atol)
    differs = [c for c in result.changes if c.status != "unchanged"]
    if differs:
        print(f"{live.name}: {len(differs)} of {len(result.changes)} examples differ from the snapshot "
              f"(rtol={args.rtol:g}, atol={args.atol:g}):")
        for c in differs:
            print("  " + c.line())
        print("  (truss-lab test --update rewrites the snapshot)")
        return EXIT_MODEL
    print(f"{live.name}: {len(result.changes)} examples match the snapshot (rtol={args.rtol:g}, atol={args.atol:g})")
    return EXIT_OK


def _load_chain(path):
    from .chains import load_chain

    return load_chain(path)


def cmd_check(args) -> int:
    try:
        from .serving.check import main_check
    except ImportError as exc:
        print(f"truss-lab check needs FastAPI, uvicorn and httpx: pip install 'truss_lab[serve]' ({exc})", file=sys.stderr)
        return EXIT_USAGE
    inputs = None
    if args.input:
        try:
            inputs = [json.loads(text) for text in args.input]
        except json.JSONDecodeError as exc:
            print(f"truss-lab check: --input is not JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
    from .live import load

    return main_check(args.path, inputs, args.json, args.truss_version, args.rtol, make_model=load, make_chain=_load_chain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="truss-lab",
        description="Run a Truss in-process with Truss's semantics: preprocess -> [lock] predict -> postprocess.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a new Truss scaffold (as `truss init` does)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--name", help="model_name in config.yaml (default: the folder name)")
    p.add_argument("--python-config", action="store_true",
                   help="a single-file ModelBase model, as `truss init --python-config` writes it")
    p.set_defaults(func=cmd_init)

    def model_args(p):
        p.add_argument("path", metavar="PATH", help="a Truss folder, a single-file model (my_model.py) or a chain's source")
        p.add_argument("--input", metavar="JSON|@FILE", help="model input as JSON, or @file (JSON or raw bytes)")
        p.add_argument("--example", metavar="NAME", help="an input from examples.yaml")
        p.add_argument("--lock", type=int, metavar="N", help="override runtime.predict_concurrency")

    p = sub.add_parser("predict", help="run one request and print its output and stage timings")
    model_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="send N requests from C workers and print the Report")
    model_args(p)
    p.add_argument("-n", type=int, default=100, metavar="N", help="number of requests (default 100)")
    p.add_argument("-c", "--concurrency", type=int, default=8, metavar="C", help="concurrent workers (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("profile", help="profile N requests per stage: where inside preprocess, predict and postprocess the time goes")
    model_args(p)
    p.add_argument("-n", type=int, default=3, metavar="N", help="number of requests (default 3)")
    p.add_argument("--top", type=int, default=5, metavar="K", help="hot spots per stage (default 5)")
    p.add_argument("--chrome-trace", metavar="FILE", help="also write the requests and their samples as Chrome trace JSON")
    p.set_defaults(func=cmd_profile)
    p = sub.add_parser("serve", help="serve the truss over HTTP with the Truss server's routes (Ctrl-C stops)")
    p.add_argument("path", metavar="PATH", help="the Truss folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--max-body-mb", type=float, default=16, metavar="MB", help="refuse bigger request bodies with 413 (default 16)")
    p.add_argument("--no-watch", action="store_true", help="do not reload on save")
    p.add_argument("--ray", action="store_true", help="run on Ray Serve: predict and pre/postprocess in separate deployments")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: predict replicas (default 1)")
    p.add_argument("--stage-replicas", type=int, default=1, metavar="N", help="with --ray: pre/postprocess replicas (default 1)")
    p.add_argument("--gpus", type=float, default=0, metavar="N", help="with --ray: GPUs per predict replica (default 0)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("snapshot", help="store every example's output next to the truss (examples.snapshot.json)")
    p.add_argument("path", metavar="PATH", help="the Truss folder")
    p.set_defaults(func=cmd_snapshot)
    p = sub.add_parser("test", help="re-run the examples and compare with the snapshot (exit 1 on a difference)")
    p.add_argument("path", metavar="PATH", help="the Truss folder")
    p.add_argument("--update", action="store_true", help="rewrite the snapshot instead")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance for numbers (default 1e-4)")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance for numbers (default 1e-6)")
    p.set_defaults(func=cmd_test)
    p = sub.add_parser("check", help="run the examples on the real Truss server and here, compare, and lint what fails only on deploy")
    p.add_argument("path", metavar="PATH", help="the Truss folder")
    p.add_argument("--input", action="append", metavar="JSON", help="a request to send (repeatable; default: every example)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--truss-version", metavar="V", help="the Truss server version to check against (default: the pinned one)")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance for numbers (default 1e-6)")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import ModelError, TrussLabError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModelError as exc:
        print(f"truss-lab {args.command}: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except (UsageError, TrussLabError) as exc:  # BundleError included
        print(f"truss-lab {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
