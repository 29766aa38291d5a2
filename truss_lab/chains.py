"""A Truss Chain in the notebook, as it deploys (needs the `chains` extra: `truss`, for truss_chains).

    chain = truss_lab.load_chain("my_chain.py")   # the @chains.mark_entrypoint chainlet, or entrypoint="Name"
    chain.run(text="hi")                          # what the deployed entrypoint answers
    chain.predict({"text": "hi"})                 # a Result (the entrypoint's trace, output, error)
    chain.chainlets["Upper"]                      # each chainlet is a LiveModel: lock, traces, guard, reload

Every chainlet is built from the truss Truss's own code generation writes for a push (generate
only: nothing leaves the machine) - the generated `TrussChainletModel`, its stubs and its pydantic
I/O - and runs as deployed: in a worker process of its own (worker.py), with the lock its
`remote_config` gives it. The chainlets a chainlet depends on are served on 127.0.0.1, and their URLs
reach the generated code the way a deployed chain finds them: through the `dynamic_chainlet_config`
mount, here a folder of the chain's (chainlet.py). So calls between chainlets cross HTTP with the
deployed serialisation, retries and errors: a value that does not survive the wire fails here as on
deploy.

Every request to the entrypoint is one W3C trace; each chainlet's trace records its span and its
caller's, so `chain.trees()` / `chain.report()` / `timeline(chain)` show which chainlet called which.
A save in the chain's folder re-runs the code generation and reloads only the chainlets whose code
changed (ChainReloader); `chain.check()` runs the generated trusses on the real Truss server, wired as
deployed (serving/check.py).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import weakref
from pathlib import Path
from typing import Any, Mapping

from .chain_gen import examples_file, generate
from .chain_reload import ChainReloader, ChainReloadEvent
from .errors import TrussLabError


def _require_truss_chains():
    try:
        import truss_chains  # noqa: F401  (a one-line error here, not a traceback from the generator)
    except ImportError:
        raise TrussLabError("load_chain() needs truss_chains (the `truss` package): pip install 'truss_lab[chains]'") from None


_PRELOAD = ("truss_chains", "fastapi", "uvicorn", "truss_lab.live", "truss_lab.serving.server")  # what every chainlet imports


class Chain:
    """A Truss Chain as deployed: each chainlet its generated truss in a worker process of its own (a
    LiveModel: lock, traces, reload), the entrypoint's dependencies served on 127.0.0.1 and found
    through the `dynamic_chainlet_config` mount, as on the platform. Made by `truss_lab.load_chain`.

    Attributes:
        chainlets: the chainlets by name, dependencies first, the entrypoint last.
        entry: the entrypoint's LiveModel.
        source: the chain's source file.

    Example:
        ```python
        chain = truss_lab.load_chain("examples/digits-chain/digits_chain.py")
        chain.run(**chain.example("three"))
        print(chain.trees()[-1])
        chain.close()
        ```
    """

    def __init__(self, source: str | os.PathLike, entrypoint: str | None = None, *, guard: bool = True,
                 secrets: Mapping[str, str] | None = None):
        _require_truss_chains()
        self.source = Path(source).resolve()
        if not self.source.is_file():
            raise TrussLabError(f"{self.source}: no such chain source file")
        from .wire import scratch_dir

        self.root = Path(scratch_dir("chain"))  # its generated trusses; gone on close, at exit, or at the next start
        weakref.finalize(self, shutil.rmtree, str(self.root), True)
        self._secrets = dict(secrets or {})
        self.mount = self.root / "dynamic-config"  # the platform's dynamic config mount, for this chain's chainlets
        self.mount.mkdir()
        self.urls: dict[str, dict[str, str]] = {}
        self.chainlets: dict[str, Any] = {}
        self._on_close: list[Any] = []
        self._key = os.urandom(16).hex()  # the chain's API key its stubs send each other
        try:
            gen = generate(self.source, entrypoint, self.root)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        self.name, self._entrypoint_arg = gen.name, entrypoint
        self.model_file = False  # a single-file model (ModelFile): its reloads read as a model's
        self._gen = gen
        folders = gen.folders
        self._guard = guard
        from .worker import spawn

        # every chainlet's process at once (as a deployed chain's start), importing truss_chains and its web
        # server side by side; each then loads in turn, dependencies first (a load() may call them)
        spawned = {display: spawn(_PRELOAD) for display in gen.order}
        try:
            for display in gen.order:
                self._start_chainlet(display, folders[display], bool(gen.depends[display]), display == gen.order[-1],
                                     spawned.pop(display))
        except BaseException:
            for proc in spawned.values():
                proc.kill()
                proc.wait()
            self.close()
            raise
        unused = sorted(set(self._secrets) - {k for c in self.chainlets.values() for k in c.bundle.secrets})
        if unused:
            import warnings

            warnings.warn(f"{self.source}: secrets {', '.join(map(repr, unused))} passed to load_chain are named by no "
                          f"chainlet's remote_config (chains.Assets(secret_keys=[...])), so none gets them (as deployed)",
                          UserWarning, stacklevel=3)
        self.entrypoint = gen.order[-1]
        self.version = 1
        self.reloader = ChainReloader(self)

    def _start_chainlet(self, display: str, folder: Path, calls_others: bool, entrypoint: bool, spawned: Any = None) -> Any:
        """Start one chainlet's generated truss in a worker process of its own, as deployed; serve it on
        127.0.0.1 unless it is the entrypoint, and give its URL to the chainlets that call it."""
        from .worker import WorkerModel

        self._write_mount()  # what it reads at start: the URLs of the chainlets it depends on (started first)
        # a chainlet that calls others does so from predict by design: the guard watches the others
        from .bundle import read_bundle

        declared = read_bundle(folder).secrets  # a chainlet gets the secrets its Assets(secret_keys=...) name, as deployed
        live = WorkerModel(folder, guard=self._guard and not calls_others, chainlet=True,
                           secrets={k: v for k, v in {**self._secrets, "baseten_chain_api_key": self._key}.items()
                                    if k in declared},  # a TrussChainlet's own truss declares none of the chain's
                           env={"TRUSS_LAB_DYNAMIC_CONFIG_DIR": str(self.mount), "TRUSS_LAB_CHAIN_FOLDER": str(self.source.parent),
                                # what a TrussHandle (a TrussChainlet's caller) reads the chain's key from, as from /secrets
                                "TRUSS_SECRET_baseten_chain_api_key": self._key,
                                "TRUSS_LAB_TRUSS_DIR": str(self._gen.truss_dirs.get(display, ""))},
                           spawned=spawned)
        self.chainlets[display] = live
        if entrypoint:  # its examples.yaml is a copy of the chain's examples file: errors name that one
            live.examples_source = self.examples_file
        if not entrypoint:  # the worker stops the server it started when it closes
            self.urls[display] = {"predict_url": f"{live.serve().url}/v1/models/model:predict"}
            self._write_mount()
        return live

    def _write_mount(self) -> None:
        import json

        (self.mount / "dynamic_chainlet_config").write_text(json.dumps(self.urls))

    def _stop_chainlet(self, display: str, folder: Path) -> None:
        """A chainlet the chain no longer has: its worker (its server with it), its generated truss."""
        live = self.chainlets.pop(display)
        self.urls.pop(display, None)
        self._write_mount()
        live.close()
        shutil.rmtree(folder, ignore_errors=True)

    @property
    def entry(self):
        """The entrypoint chainlet's LiveModel (what `%truss predict` sends to)."""
        return self.chainlets[self.entrypoint]

    @property
    def examples_file(self) -> Path:
        """Where the chain's examples are: `<source stem>.examples.yaml` next to it, else `examples.yaml` in its folder."""
        return examples_file(self.source)

    @property
    def examples(self) -> list:
        """The chain's examples (see examples_file): what `truss-lab check` sends, the panel's dropdown."""
        return list(self.entry.bundle.examples)

    def example(self, name: str) -> Any:
        """The input of the example called `name`: an entrypoint JSON body (`chain.run(**chain.example("three"))`)."""
        return self.entry.example(name)

    def check(self, inputs=None, **kwargs):
        """`truss-lab check` on this chain: every chainlet's generated truss on the real Truss server, wired
        as deployed, and the chain's examples (or `inputs`) sent to both entrypoints and compared.

        Args:
            inputs: the entrypoint bodies to send instead of the examples.
            **kwargs: as for `truss_lab.check`.

        Returns:
            A CheckReport (`.ok`).

        Example:
            ```python
            chain.check().ok
            ```
        """
        from .serving.check import check_chain

        return check_chain(self, inputs, **kwargs)

    def predict(self, body: Any):
        """What the deployed entrypoint answers for a JSON body.

        Args:
            body: the entrypoint's JSON body.

        Returns:
            A Result whose output is that JSON answer.

        Raises:
            ModelError: a chainlet failed (the error names it and what failed).

        Example:
            ```python
            chain.predict(chain.example("three")).output
            ```
        """
        import json

        from .serialization import truss_json

        result = self.entry.predict(body)  # a new trace: every chainlet's part of it is a span (runner.py)
        return dataclasses.replace(result, output=json.loads(truss_json(result.output)))

    def run(self, **kwargs: Any) -> Any:
        """The entrypoint's `run_remote(**kwargs)`, as the deployed chain runs it.

        Args:
            **kwargs: the entrypoint's arguments (its JSON body's fields).

        Returns:
            Its answer as the deployed chain sends it (JSON values).

        Raises:
            ModelError: a chainlet failed (the error names it and what failed).

        Example:
            ```python
            chain.run(image_b64=b64, top_k=3)
            ```
        """
        return self.predict(kwargs).output

    def serve(self, host: str = "127.0.0.1", port: int = 0, max_body: int | None = None):
        """The entrypoint over HTTP with the Truss server's routes, as the deployed chain answers
        (`POST /v1/models/model:predict` with the entrypoint's JSON body); `POST /hot-reload` reloads the
        chain. `truss-lab serve my_chain.py` runs this.

        Args:
            host: the address to bind.
            port: the port; 0 picks a free one.
            max_body: bigger request bodies are refused with 413 (`--max-body-mb`; default 16 MB).

        Returns:
            The running server: `.url`, `.stop()`.

        Example:
            ```python
            server = chain.serve()
            server.stop()
            ```
        """
        return self.entry.serve(host=host, port=port, max_body=max_body, on_hot_reload=self.reload)

    def trees(self, last: int | None = None, traces: dict[str, list] | None = None) -> list["Call"]:
        """The request trees, oldest first: per request to the entrypoint, which chainlet called which, each
        with its trace (lock wait, stages, error). Built from the chainlets' kept traces by their trace
        context (every request's chainlets share its trace id; a call's parent is its caller's span).

        Args:
            last: only the last `last` trees.
            traces: the chainlets' traces to build them from (default: what each keeps now).

        Returns:
            Calls (`chainlet`, `trace`, `calls`); `print(call)` draws the tree.

        Example:
            ```python
            print(chain.trees(last=1)[0])
            ```
        """
        traces = traces if traces is not None else self._traces()
        calls: dict[str, Call] = {}
        for name, kept in traces.items():
            for t in kept:
                if t.span_id is not None:
                    calls[t.span_id] = Call(name, t)
        roots: list[Call] = []
        for call in sorted(calls.values(), key=lambda c: c.trace.start):
            parent = calls.get(call.trace.parent_span_id or "")
            (parent.calls if parent is not None else roots).append(call)
        entry = [r for r in roots if r.chainlet == self.entrypoint]
        if entry:
            for orphan in (r for r in roots if r.chainlet != self.entrypoint):
                self._place(orphan, entry)
        roots = entry or roots
        return roots if last is None else roots[-last:] if last > 0 else []

    def _place(self, orphan: "Call", entry: list["Call"]) -> None:
        """A call that came without a trace context (a TrussChainlet's: a TrussHandle sends no
        `traceparent`) under the one call that depends on its chainlet and was running all through it;
        none or several (concurrent requests): it stays out of the trees."""
        start, end = orphan.trace.start, orphan.trace.end or orphan.trace.start
        callers = [c for root in entry for c in root.walk()
                   if orphan.chainlet in self._gen.depends.get(c.chainlet, ())
                   and c.trace.start <= start and end <= (c.trace.end or float("inf"))]
        if len(callers) == 1:
            callers[0].calls.append(orphan)
            callers[0].calls.sort(key=lambda c: c.trace.start)

    def _traces(self) -> dict[str, list]:
        """Each chainlet's kept traces, fetched once from its worker."""
        return {name: live.traces for name, live in self.chainlets.items()}

    def report(self, last: int | None = None) -> "ChainReport":
        """A Report per chainlet (its lock, waits and stages) and the request trees.

        Args:
            last: only the traces of the last `last` requests to the entrypoint.

        Returns:
            A ChainReport: `.reports` by chainlet, `.trees`; `.to_chrome_trace(path)`, `.to_otel(path)`.

        Example:
            ```python
            chain.report().to_chrome_trace("chain.json")
            ```
        """
        from .trace import Report

        traces = self._traces()
        trees = self.trees(last, traces)
        locks = {n: live.concurrency for n, live in self.chainlets.items()}
        if last is not None:
            spans = {name: set() for name in self.chainlets}
            for tree in trees:
                for call in tree.walk():
                    spans[call.chainlet].add(id(call.trace))
            traces = {name: [t for t in kept if id(t) in spans[name]] for name, kept in traces.items()}
        reports = {name: Report.from_traces(kept, locks[name]) for name, kept in traces.items()}
        return ChainReport(self.name, reports, trees, locks)

    def timeline(self, last: int | None = None):
        """The requests' timeline with a lane per chainlet (`truss_lab.timeline(chain)`)."""
        from .display.plots import chain_timeline

        return chain_timeline(self, last)

    # -------------------------------------------------------------- hot reload

    def reload(self, full: bool = False) -> "ChainReloadEvent":
        """Regenerate the chainlet trusses from the chain's source as it is now and reload the chainlets whose
        code changed (each by its truss rule: a method swap keeps its loaded state); the others are left
        untouched.

        Args:
            full: rebuild every chainlet (their `__init__` runs again).

        Returns:
            A ChainReloadEvent: `.chainlets` maps each reloaded chainlet to its ReloadEvent, `.untouched`
            lists the others; a failed one names the chainlet, the file and the line.

        Example:
            ```python
            event = chain.reload()
            event.ok, event.changed
            ```
        """
        return self.reloader.reload(full=full)

    def watch(self, examples: bool = False) -> "Chain":
        """Reload on every save of a file of the chain's folder that its ignore rules keep (its source, the
        helpers it imports, data files), and of the data_dirs and truss_dirs outside it.

        Args:
            examples: also re-run the entrypoint's examples after every reload and diff them.

        Returns:
            The chain.

        Example:
            ```python
            chain.watch()
            ```
        """
        self.reloader.watch()
        return self

    def unwatch(self) -> None:
        """Stop reloading on save."""
        self.reloader.unwatch()

    @property
    def watching(self) -> bool:
        """Whether a save reloads the chain now."""
        return self.reloader.watching

    def on_reload(self, callback):
        """Call `callback(event)` (a ChainReloadEvent) after each reload; returns the unsubscriber."""
        return self.reloader.on_reload(callback)

    @property
    def reload_history(self) -> list:
        """The chain's last ChainReloadEvents, oldest first."""
        return list(self.reloader.history)

    @property
    def reload_count(self) -> int:
        """How many reloads the chain has made (read it before an edit, then `wait_for_reload(since=n)`)."""
        return self.reloader.count

    def wait_for_reload(self, since: int, timeout: float = 30.0) -> "ChainReloadEvent":
        """Block until the watcher has reloaded after `since` (a `reload_count` read before the edit)."""
        event = self.reloader.wait(since, timeout)
        if event is None:
            raise TimeoutError(f"no reload of the chain {self.name} within {timeout} s")
        return event

    def on_close(self, callback) -> None:
        """Call `callback()` once, when the chain is closed."""
        self._on_close.append(callback)

    def close(self) -> None:
        """Stop every chainlet's process and the watcher, and remove the chain's scratch folders; every later
        call raises. Also a context manager: `with truss_lab.load_chain(path) as chain: ...`.

        Example:
            ```python
            chain.close()
            ```
        """
        for callback in self.__dict__.pop("_on_close", []):
            try:
                callback()
            except Exception:
                pass
        if getattr(self, "reloader", None) is not None:
            self.reloader.unwatch()
        for live in self.chainlets.values():
            live.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Chain {self.name!r} from {self.source}: {', '.join(self.chainlets)} (entrypoint {self.entrypoint})>"


def load_chain(source: str | os.PathLike, entrypoint: str | None = None, *, guard: bool = True,
               secrets: Mapping[str, str] | None = None) -> Chain:
    """Load the Truss Chain in `source` as it deploys (see the module docstring). `secrets`: what each
    chainlet's `depends_context()` finds in `context.secrets` (as `secrets=` of `truss_lab.load`)."""
    return Chain(source, entrypoint, guard=guard, secrets=secrets)


class ModelFile:
    """A single-file model (`class Model(truss_chains.ModelBase)`, what `truss init --python-config`
    writes) as `truss push my_model.py` deploys it: the truss Truss's own generation makes of it, run
    in a worker process, with LiveModel's API (`truss_lab.load("my_model.py")`). Its requests, lock,
    traces, bench and profile are its truss's; reload, watch and close are its file's (a save
    regenerates the truss and reloads it: a method edit keeps the loaded state)."""

    _OF_THE_FILE = frozenset({"reload", "watch", "unwatch", "watching", "on_reload", "reload_history", "reload_count",
                              "wait_for_reload", "close", "check", "chain", "source"})
    _SETTABLE = frozenset({"concurrency", "guard", "reload_drain_timeout"})

    def __init__(self, chain: Chain):
        object.__setattr__(self, "chain", chain)
        object.__setattr__(self, "source", chain.source)
        chain.model_file = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.chain if name in self._OF_THE_FILE else self.chain.entry, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._SETTABLE:
            raise AttributeError(f"{name!r} cannot be set on a single-file model")
        setattr(self.chain.entry, name, value)

    def serve(self, host: str = "127.0.0.1", port: int = 0, max_body: int | None = None):
        return self.chain.serve(host, port, max_body)  # POST /hot-reload regenerates it from the file

    @property
    def class_name(self) -> str:
        """The model's class in its file (`Model`)."""
        return self.chain._gen.classes[self.chain.entrypoint][1]

    @property
    def model(self) -> Any:
        raise TrussLabError(f"{self.source}: a single-file model runs its generated truss in a worker process "
                            f"(pid {self.chain.entry.pid}): its model object lives there")

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.chain.close()

    def __repr__(self) -> str:
        return f"<LiveModel {self.chain.name!r} from {self.source} (its generated truss, in a worker process)>"


@dataclasses.dataclass
class Call:
    """One chainlet's part of a request: its trace, and the calls it made (in the order they started)."""

    chainlet: str
    trace: Any
    calls: list["Call"] = dataclasses.field(default_factory=list)

    def walk(self):
        yield self
        for call in self.calls:
            yield from call.walk()

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def edges(self):
        """(caller, call) for every call below this one, callers before their calls."""
        for call in self.calls:
            yield self, call
            yield from call.edges()

    def lines(self, indent: str = "", last: bool = True, top: bool = True) -> list[str]:
        t = self.trace
        what = f"{t.total_ms:.1f} ms (lock wait {t.lock_wait_ms:.1f}, predict {t.predict_ms:.1f})"
        if not t.ok:
            what += f" FAILED in {t.error_stage}: {t.error}"
        branch = "" if top else ("└─ " if last else "├─ ")
        out = [f"{indent}{branch}{self.chainlet} #{t.request_id} {what}"]
        inner = indent + ("" if top else ("   " if last else "│  "))
        for i, call in enumerate(self.calls):
            out += call.lines(inner, i == len(self.calls) - 1, top=False)
        return out


@dataclasses.dataclass
class ChainReport:
    """`chain.report()`: a Report per chainlet and the request trees (which chainlet called which)."""

    chain: str
    reports: dict[str, Any]
    trees: list[Call]
    locks: dict[str, int]

    def __getitem__(self, chainlet: str):
        return self.reports[chainlet]

    def to_chrome_trace(self, path: Any = None) -> dict:
        """Chrome trace-event JSON (Perfetto): a process per chainlet, a flow arrow per call (export.py)."""
        from .export import chain_chrome_trace

        return chain_chrome_trace(self, path)

    def to_otel(self, path: Any = None, exporter: Any = None) -> int:
        """OpenTelemetry spans, one trace per request, a service per chainlet (export.py)."""
        from .export import chain_otel

        return chain_otel(self, path, exporter)

    def table(self) -> str:
        rows = [f"chain {self.chain}: {len(self.trees)} requests"]
        rows.append(f"  {'chainlet':<14}{'lock':>5}{'calls':>7}{'max held':>9}{'wait p50':>10}{'predict p50':>12}{'failed':>8}")
        for name, r in self.reports.items():
            rows.append(f"  {name:<14}{self.locks[name]:>5}{r.count:>7}{r.max_lock_holders:>9}"
                        f"{r.stages['lock_wait'].p50:>8.1f}ms{r.stages['predict'].p50:>10.1f}ms{sum(r.failures.values()):>8}")
        return "\n".join(rows)

    def __str__(self) -> str:
        shown = self.trees[-5:]
        tree_lines = [line for tree in shown for line in tree.lines("  ")]
        more = f"  ... {len(self.trees) - len(shown)} earlier requests (report.trees)" if len(self.trees) > len(shown) else ""
        return "\n".join([self.table(), "request trees:" if shown else "no requests yet", *tree_lines] + ([more] if more else []))

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display.style import esc

        text = str(self)
        return {"text/plain": text, "text/html": f"<pre class='truss-lab truss-lab-chain-report'>{esc(text)}</pre>"}
