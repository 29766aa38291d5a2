"""`%truss` and `%%truss`: a thin IPython front end over LiveModel (everything drawn by display/).

    %load_ext truss_lab
    %truss load my-truss            # -> variable `my_truss`, watching for edits
    %truss predict [1, 2, 3]        # a Python value, a path, a URL, or example:NAME
    %truss predict --method chat_completions {'messages': [...]}   # an OpenAI-compatible method
"""

from __future__ import annotations

import argparse
import gc
import json
import keyword
import re
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from ..errors import ModelError, TrussLabError
from .magic_args import _HelpShown, _is_file, _subparsers, build_parser, split_expr, split_line, strip_comment, variable_name


@magics_class
class TrussMagics(Magics):
    def __init__(self, shell):
        super().__init__(shell)
        self.current: Any = None  # the LiveModel %truss commands act on by default
        self._chains: dict[int, Any] = {}  # id(entrypoint LiveModel) -> its Chain (loaded with %truss load my_chain.py)
        self.last_error: ModelError | None = None
        self.last_bench = None
        self.parser = build_parser()
        self._notices: dict[int, Any] = {}  # id(LiveModel) -> (display handle, unsubscribe)

    @line_cell_magic
    def truss(self, line: str, cell: str | None = None):
        try:
            args = self.parse(line)
        except _HelpShown:
            return None
        if args.command is None:
            self.parser.print_help()
            return None
        try:
            return getattr(self, f"cmd_{args.command}")(args, cell)
        except UsageError:
            raise
        except TrussLabError as exc:  # bundle and load errors: one line, no traceback through us
            if isinstance(exc, ModelError):
                self.last_error = exc
            raise UsageError(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:  # a folder it cannot write, a file it cannot read: say which, in one line
            raise UsageError(f"%truss {args.command}: {exc}") from None

    def parse(self, line: str) -> argparse.Namespace:
        """The line's arguments. A command that takes EXPR (predict, bench) reads its options up to the
        first word that is not one of them, and takes the rest of the line verbatim as EXPR: `-1`,
        `'it\\'s'` or a 300-character dict are inputs, not options or shell words."""
        line = strip_comment(line)
        command = line.split(None, 1)[0] if line.strip() else ""
        sub = _subparsers(self.parser).get(command)
        if sub is not None and any(a.dest == "expr" for a in sub._actions):
            rest = line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else ""
            tokens, expr_text = split_expr(rest, sub)
            args = self.parser.parse_args([command, *tokens])
            args.expr_text = expr_text
            return args
        try:
            tokens = split_line(line)
        except ValueError as exc:  # shlex: unbalanced quotes
            raise UsageError(f"%truss: cannot parse the arguments: {exc}") from None
        args = self.parser.parse_args(tokens)
        args.expr_text = ""
        return args

    # ------------------------------------------------------------------ helpers

    def model(self, var: str | None):
        from ..live import LiveModel

        if var is None:
            if self.current is not None:
                return self.current
            loaded = {name: v for name, v in self.shell.user_ns.items() if isinstance(v, LiveModel) and not name.startswith("_")}
            if len(loaded) == 1:  # e.g. the model `make lab` preloads: no need to name it
                self.current = next(iter(loaded.values()))
                return self.current
            if loaded:
                raise UsageError(f"several models in this notebook ({', '.join(sorted(loaded))}): pick one with --model VAR")
            raise UsageError("no model loaded yet: run %truss load PATH first")
        value = self.shell.user_ns.get(var)
        if id(getattr(value, "entry", None)) in self._chains:  # a chain: its entrypoint answers
            return value.entry
        if not isinstance(value, LiveModel):
            raise UsageError(f"--model {var}: not a LiveModel (or a chain) in this notebook")
        return value

    def evaluate(self, text: str, live) -> Any:
        """EXPR: example:NAME, a path or URL as a string, else a Python expression in the user namespace."""
        text = text.strip()
        if not text:
            raise UsageError("%truss predict: give an input: a Python value, a path, a URL, or example:NAME")
        if text.startswith("example:"):
            return live.example(text[len("example:"):])
        if re.match(r"^[a-z][a-z0-9+.-]*://", text) or _is_file(text):
            return text
        try:
            return self.shell.ev(text)
        except Exception as exc:
            raise UsageError(f"%truss predict: cannot evaluate {text!r}: {type(exc).__name__}: {exc}") from None

    def cell_input(self, cell: str) -> Any:
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            pass
        try:
            return self.shell.ev(cell.strip())
        except Exception as exc:
            raise UsageError(f"%%truss predict: the cell is neither JSON nor a Python expression: {type(exc).__name__}: {exc}") from None

    def attach_notices(self, live) -> None:
        """Show each reload in the `%truss load` cell's output, as it happens (no cell re-run)."""
        if id(live) in self._notices:
            return
        handle = display(_Notice(f"{live.name} v{live.version}: loaded; watching for edits" if live.watching else f"{live.name} v{live.version}: loaded"), display_id=True)

        def show(event) -> None:
            if not event.ok and event.exception is not None:
                self.last_error = event.exception  # %truss traceback shows why the reload failed
            if handle is not None:
                handle.update(event)

        key = id(live)
        self._notices[key] = (handle, live.on_reload(show))
        live.on_close(lambda: self._notices.pop(key, None))

    def attach_examples(self, live) -> None:
        """Show each ExamplesDiff in the `%truss load` cell's live area (where the reload notice is,
        updated in place), or in this cell's output when the model was not loaded by %truss load."""
        notice = self._notices.get(id(live))
        handle = notice[0] if notice is not None and notice[0] is not None else None
        message = _Notice(f"{live.name}: examples will be re-run after every reload")
        display(message)
        if handle is None:
            handle = display(message, display_id=True)

        def show(d) -> None:
            if handle is not None:
                handle.update(d)

        live.on_examples(show)

    # ------------------------------------------------------------------ commands

    def cmd_init(self, args, cell):
        from ..scaffold import init

        path = init(args.path, name=args.name, python_config=args.python_config)
        if args.python_config:
            print(f"wrote a single-file model at {path} (edit it, then %truss load {path})")
        else:
            print(f"wrote a new Truss at {path} (edit model/model.py, then %truss load {args.path})")

    def cmd_load(self, args, cell):
        from ..live import LiveModel, load

        from ..chain_gen import is_model_file

        single = args.path.endswith(".py") and Path(args.path).is_file()
        if single and not is_model_file(Path(args.path)):  # a Truss Chain's source
            return self.load_chain(args)
        var = args.var or variable_name(Path(args.path).stem if single else args.path)  # my_model.py: `my_model`
        if not var.isidentifier() or keyword.iskeyword(var):
            raise UsageError(f"--as {var}: not a valid variable name")
        old = self.shell.user_ns.get(var)
        live = load(args.path, concurrency=args.concurrency, guard=not args.no_guard)
        if isinstance(old, LiveModel):
            old.close()  # re-running the cell replaces the model; stop the old one's watcher
        self.shell.user_ns[var] = live
        if isinstance(old, LiveModel):
            del old
            gc.collect()  # the old model's module globals sit in reference cycles: free them (and its weights) now
        self.current = live
        if not args.no_watch:
            live.watch()
        display(LoadSummary(live, var))
        self.attach_notices(live)

    def load_chain(self, args):
        """`%truss load my_chain.py`: the chain bound to a variable; %truss predict etc. act on its entrypoint."""
        from ..chains import load_chain

        var = args.var or variable_name(Path(args.path).stem)
        old = self.shell.user_ns.get(var)
        chain = load_chain(args.path, guard=not args.no_guard)
        if hasattr(old, "close") and old is not chain:
            old.close()
        self.shell.user_ns[var] = chain
        self.current = chain.entry
        self._chains[id(chain.entry)] = chain
        chain.on_close(lambda key=id(chain.entry): self._chains.pop(key, None))
        if not args.no_watch:
            chain.watch()  # a save reloads only the chainlets whose code changed
        print(f"{chain!r} as `{var}`; %truss predict, bench, profile and the panel send to its entrypoint; "
              f"%truss timeline, reload, check act on the chain")
        self.attach_notices(chain)

    def chain_of(self, live) -> Any:
        """The chain whose entrypoint `live` is (chain-wide commands: reload, watch, timeline, check), or None."""
        return self._chains.get(id(live))

    def cmd_predict(self, args, cell):
        live = self.model(args.model)
        if cell is not None:
            if args.expr_text:
                raise UsageError("%%truss predict: the input is the cell body; give no EXPR on the line")
            model_input = self.cell_input(cell)
        else:
            model_input = self.evaluate(args.expr_text, live)
        result = live.run(model_input, method=args.method)
        if result.error is not None:
            self.last_error = result.error
        display(result)

    def cmd_reload(self, args, cell):
        live = self.model(args.model)
        event = (self.chain_of(live) or live).reload(full=args.full)
        if not event.ok and event.exception is not None:
            self.last_error = event.exception
        display(event)

    def cmd_watch(self, args, cell):
        live = self.model(args.model)
        chain = self.chain_of(live)
        if chain is not None:
            chain.watch() if args.state == "on" else chain.unwatch()
            self.attach_notices(chain)
            print(f"chain {chain.name}: {'watching ' + str(chain.source.parent) + ' for edits' if chain.watching else 'not watching'}")
            return
        if args.state == "on":
            live.watch(examples=args.examples)
            self.attach_notices(live)
            if args.examples:
                self.attach_examples(live)
        else:
            live.unwatch()
        print(f"{live.name}: {'watching ' + str(live.path) + ' for edits' if live.watching else 'not watching'}")

    def cmd_status(self, args, cell):
        live = self.model(args.model)
        display(Status(live, self.chain_of(live)))

    def cmd_bench(self, args, cell):
        live = self.model(args.model)
        inputs = [self.evaluate(args.expr_text, live)] if args.expr_text else None
        report = live.bench(inputs, n=args.n, concurrency=args.c, label=args.var or "")
        self.last_bench = report
        if args.var:
            self.shell.user_ns[args.var] = report
        display(report)

    def cmd_profile(self, args, cell):
        live = self.model(args.model)
        model_input = self.evaluate(args.expr_text, live) if args.expr_text else None
        if args.n < 1:
            raise UsageError(f"%truss profile -n {args.n}: N must be 1 or more")
        profile = live.profile(model_input, n=args.n)
        if args.var:
            self.shell.user_ns[args.var] = profile
        display(profile)

    def cmd_timeline(self, args, cell):
        from ..display.plots import timeline

        live = self.model(args.model)
        if args.last is not None and args.last < 1:
            raise UsageError(f"%truss timeline --last {args.last}: N must be 1 or more (the last N traces)")
        chain = self.chain_of(live)
        if chain is not None:  # a lane per chainlet
            if not chain.trees():
                print(f"chain {chain.name}: no requests yet; run %truss predict or %truss bench first")
                return
            display(timeline(chain, last=args.last))
            return
        if self.last_bench is not None and args.last is None:
            source = self.last_bench
        else:
            source = live.report(last=args.last)
        if not source.count:
            print(f"{live.name}: no requests yet; run %truss predict or %truss bench first")
            return
        display(timeline(source, by=args.by))

    def cmd_compare(self, args, cell):
        from ..display.compare import compare

        reports = []
        for name in (args.a, args.b):
            if name not in self.shell.user_ns:
                raise UsageError(f"%truss compare: no variable {name!r} (bind one with %truss bench --as {name})")
            reports.append(self.shell.user_ns[name])
        try:
            display(compare(*reports, labels=(args.a, args.b)))
        except TypeError as exc:
            raise UsageError(f"%truss compare: {exc}") from None

    def cmd_check(self, args, cell):
        live = self.model(args.model)
        inputs = None
        if args.input:
            try:
                inputs = [json.loads(text) for text in args.input]
            except json.JSONDecodeError as exc:
                raise UsageError(f"%truss check --input: not JSON: {exc}") from None
        display((self.chain_of(live) or live).check(inputs))

    def cmd_guard(self, args, cell):
        live = self.model(args.model)
        live.guard = args.state == "on"
        print(f"{live.name}: lock-misuse guard {'on' if live.guard else 'off'}")

    def cmd_widget(self, args, cell):
        from .widgets import widget

        live = self.model(args.model)
        display(widget(live, chain=self.chain_of(live)))

    def cmd_traceback(self, args, cell):
        if self.last_error is None:
            print("no model error yet")
            return
        tb = self.last_error.model_traceback() if hasattr(self.last_error, "model_traceback") else None
        print(tb if tb else str(self.last_error))


TrussMagics.truss.__doc__ = build_parser().format_help()  # `%truss?` shows the same help as --help


class _Notice:
    def __init__(self, text: str):
        self.text = text

    def _repr_mimebundle_(self, include=None, exclude=None):
        from ..display.style import esc

        return {"text/plain": self.text, "text/html": f'<div class="truss-lab" style="color:#666;font-family:monospace;font-size:12px">⟳ {esc(self.text)}</div>'}


class LoadSummary:
    """What `%truss load` shows: name, class, load time, methods, lock size, examples."""

    def __init__(self, live, var: str):
        self.live, self.var = live, var

    def lines(self) -> list[tuple[str, str]]:
        live = self.live
        examples = ", ".join(live.examples) or "none"
        source = getattr(live, "source", None)  # a single-file model: its file and class, not its generated truss's
        cls = f"{live.class_name} in {source.name}" if source else live.bundle.model_class_name
        return [
            ("model", f"{live.name} (class {cls}) as `{self.var}`"),
            ("process", "this kernel" if live.process == "kernel" else f"a worker process (pid {live.pid})"),
            ("from", str(source or live.path)),
            ("load()", f"{live.load_ms:.0f} ms"),
            ("methods", ", ".join(live.methods())),
            ("lock", f"{live.concurrency} (runtime.predict_concurrency)"),
            ("examples", examples),
            ("watching", "yes" if live.watching else "no"),
        ] + _schema_line(live)

    def _repr_mimebundle_(self, include=None, exclude=None):
        from ..display.style import esc

        rows = self.lines()
        text = "\n".join(f"{k:<9} {v}" for k, v in rows)
        html = "".join(f"<tr><td class='k'><b>{esc(k)}</b></td><td style='text-align:left'>{esc(v)}</td></tr>" for k, v in rows)
        return {"text/plain": text, "text/html": f'<div class="truss-lab"><table>{html}</table></div>'}


def _schema_line(live) -> list[tuple[str, str]]:
    """("schema", "In -> Out") for a model with typed I/O (its full JSON schemas: tr.schema())."""
    schema = live.schema()
    if schema is None:
        return []

    def title(part: dict | None, streams: bool = False) -> str:
        if part is None:
            return "stream" if streams else "any"
        return str(part.get("title", "object"))

    return [("schema", f"{title(schema['input_schema'])} -> {title(schema['output_schema'], bool(schema['supports_streaming']))} "
                       f"(tr.schema(), GET /v1/models/model/schema)")]


class Status(LoadSummary):
    """`%truss status`: a model's, or - for a chain's entrypoint - the chain's watching and reloads."""

    def __init__(self, live, chain=None):
        super().__init__(live, "")
        self.chain = chain

    def lines(self) -> list[tuple[str, str]]:
        live, chain = self.live, self.chain
        reloads = chain if chain is not None else live  # a chain's saves are the chain's reloads
        last = reloads.reload_history[-1].summary() if reloads.reload_history else "none"
        report = live.report()
        summary = (
            f"{report.count} requests, p50 {report.stages['total'].p50:.1f} ms, "
            f"{report.throughput:.1f} req/s, lock utilization {report.lock_utilization:.0%}"
            if report.count
            else "no requests yet"
        )
        rows = [("chain", f"{chain.name} v{chain.version}: {', '.join(chain.chainlets)} (entrypoint below)")] if chain else []
        return rows + [
            ("model", f"{live.name} v{live.version}"),
            ("lock", str(live.concurrency)),
            ("watching", "yes" if reloads.watching else "no"),
            ("guard", "on" if live.guard else "off"),
            ("reload", last),
            ("traces", f"{len(live.traces)} kept"),
            ("report", summary),
        ]


_registered: list[TrussMagics] = []


def load_ipython_extension(ip) -> None:
    magics = TrussMagics(ip)
    ip.register_magics(magics)
    _registered.append(magics)


def unload_ipython_extension(ip) -> None:
    from ..live import LiveModel

    for magics in _registered:
        for _handle, unsubscribe in magics._notices.values():
            unsubscribe()
    _registered.clear()
    for value in list(ip.user_ns.values()):
        if isinstance(value, LiveModel):
            value.unwatch()
    ip.magics_manager.magics["line"].pop("truss", None)
    ip.magics_manager.magics["cell"].pop("truss", None)
