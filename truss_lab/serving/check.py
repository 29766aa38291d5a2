"""`truss-lab check`: will this truss behave the same when deployed? Answered without Docker.

    truss-lab check my-truss                     # every example in examples.yaml
    truss-lab check my-truss --input '{"x": 1}'  # or given inputs
    report = tr.check()                          # in Python / the notebook (`%truss check`)

1. The truss runs on the real Truss server (the pinned version, serving/truss_server.py), in an
   environment with the truss's own `requirements` installed (cached by their hash): a requirement
   left out fails here as on deploy, with the import that failed.
2. Every example goes to both that server and truss_lab's server; the answers are compared (status,
   body - numbers within a tolerance -, stream chunks), with the first differing JSON path, and
   truss_lab's per-stage times beside the Truss server's end-to-end time.
3. Lints for what only fails on deploy, each with file:line and a fix (`lint()`).

A CheckReport comes back: `ok`, a text table (`str()`), HTML in the notebook, JSON (`to_json()`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..bundle import Bundle, read_bundle
from ..errors import TrussLabError
from ..jsondiff import ATOL, RTOL, first_difference, short_json
from .lints import Finding, lint, requirements_of as _requirements

PREDICT = "/v1/models/model:predict"
__all__ = ["CheckReport", "ExampleResult", "Finding", "check", "first_difference", "lint"]


@dataclass
class ExampleResult:
    name: str
    input: Any
    same: bool
    truss_status: int | None
    lab_status: int | None
    difference: str | None = None  # "path: Truss value vs truss_lab value", or what differs
    truss_ms: float | None = None  # end to end on the Truss server
    lab_stage_ms: dict[str, float] = field(default_factory=dict)  # truss_lab's per-stage times
    streamed: bool = False


@dataclass
class CheckReport:
    truss: str
    truss_version: str
    examples: list[ExampleResult]
    findings: list[Finding]
    server_loaded: bool
    rtol: float = RTOL
    atol: float = ATOL
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every example the same and no finding an error: `truss-lab check` exits 0."""
        return self.server_loaded and all(e.same for e in self.examples) and not any(f.severity == "error" for f in self.findings)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, default=repr, indent=2)

    def __str__(self) -> str:
        lines = [f"truss-lab check {self.truss} against the Truss {self.truss_version} server: "
                 f"{'OK' if self.ok else 'DIFFERENCES'} ({self.seconds:.1f} s)"]
        if not self.server_loaded:
            lines.append("  the Truss server could not load the model (see the errors below)")
        if self.examples:
            width = max(len(e.name) for e in self.examples)
            lines.append(f"  {'example'.ljust(width)}  result     Truss e2e   truss_lab pre / predict / post")
            for e in self.examples:
                verdict = "same" if e.same else "DIFFERENT"
                truss = f"{e.truss_ms:8.1f} ms" if e.truss_ms is not None else "       -   "
                stages = " / ".join(f"{e.lab_stage_ms.get(s, 0):.1f}" for s in ("pre", "predict", "post"))
                lines.append(f"  {e.name.ljust(width)}  {verdict:9}  {truss}   {stages} ms")
                if e.difference:
                    lines.append(f"  {' ' * width}    {e.difference}")
        lines.append(f"  numbers compared with rtol={self.rtol:g}, atol={self.atol:g}")
        for f in self.findings:
            lines.append("  " + f.line())
        if not self.findings:
            lines.append("  no findings")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_mimebundle_(self, include=None, exclude=None):
        from ..display.style import esc

        colour = "#2e7d32" if self.ok else "#c62828"
        rows = []
        for e in self.examples:
            verdict = "<b style='color:#2e7d32'>same</b>" if e.same else "<b style='color:#c62828'>different</b>"
            diff = f"<div style='color:#c62828'>{esc(e.difference)}</div>" if e.difference else ""
            stages = " / ".join(f"{e.lab_stage_ms.get(s, 0):.1f}" for s in ("pre", "predict", "post"))
            truss = f"{e.truss_ms:.1f} ms" if e.truss_ms is not None else "-"
            rows.append(f"<tr><td>{esc(e.name)}</td><td>{verdict}{diff}</td><td>{truss}</td><td>{stages} ms</td></tr>")
        items = []
        for f in self.findings:
            sev = "#c62828" if f.severity == "error" else "#ef6c00"
            where = f"<code>{esc(f.location)}</code> " if f.location else ""
            items.append(f"<li><b style='color:{sev}'>{esc(f.severity)}</b> {where}{esc(f.message)} — <i>{esc(f.fix)}</i></li>")
        html = (
            f"<div class='truss-lab-check'><div><b>truss-lab check</b> {esc(self.truss)} against the Truss "
            f"{esc(self.truss_version)} server: <b style='color:{colour}'>{'OK' if self.ok else 'differences'}</b> "
            f"({self.seconds:.1f} s)</div>"
            + ("" if self.server_loaded else "<div style='color:#c62828'>the Truss server could not load the model</div>")
            + ("<table><tr><th>example</th><th>result</th><th>Truss end to end</th><th>truss_lab pre / predict / post</th></tr>"
               + "".join(rows) + "</table>" if rows else "")
            + f"<div style='color:#666'>numbers compared with rtol={self.rtol:g}, atol={self.atol:g}</div>"
            + ("<ul>" + "".join(items) + "</ul>" if items else "<div>no findings</div>")
            + "</div>"
        )
        return {"text/plain": str(self), "text/html": html}


# ------------------------------------------------------------------------------------------ run


def check(
    truss: str | os.PathLike | Any,
    inputs: Iterable[Any] | None = None,
    *,
    make_model: Callable[[Path], Any] | None = None,
    truss_version: str | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
    note: Callable[[str], None] | None = None,
) -> CheckReport:
    """Run the check on a LiveModel (its folder, and it serves the truss_lab side) or on a truss folder,
    loaded with `make_model(path)` (`truss_lab.check` passes `truss_lab.load`). `inputs`: the requests
    to send (default: every example in examples.yaml)."""
    from .truss_server import TRUSS_VERSION, ServerEnv

    t0 = time.perf_counter()
    live = truss if hasattr(truss, "bundle") and hasattr(truss, "serve") else None
    if live is None and make_model is None:
        raise TrussLabError("check() of a folder needs make_model (truss_lab.check(path) passes truss_lab.load)")
    bundle = live.bundle if live is not None else read_bundle(truss)
    env = ServerEnv.ensure(truss_version or TRUSS_VERSION, note=note)
    requirements = _requirements(bundle)
    overlay = env.requirements_overlay(requirements, note=note)
    examples = _named_inputs(inputs, bundle.examples)
    findings = lint(bundle, env_python=env.python_version, server_site=_server_site(env))
    if not examples:
        findings.append(Finding("warning", "examples", "no examples to send: only the server's load and the lints were checked",
                                f"add examples to {bundle.examples_filename}, or pass inputs (--input JSON)"))
    server_env = {"PYTHONPATH": str(overlay / "site")} if overlay is not None else None
    results: list[ExampleResult] = []
    loaded = False
    owned = live is None
    if owned:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            live = make_model(bundle.path)
    try:
        with env.start(bundle.path, env=server_env, timeout=600) as oracle:
            loaded = oracle.wait_ready(1)
            if not loaded:
                findings.extend(_load_failure(oracle.output(), requirements, bundle))
            results = _compare_all(examples, oracle.url if loaded else None, live, rtol, atol)
        findings.extend(_lock_findings(live, len(examples)))
    finally:
        if owned:
            live.close()
    return CheckReport(
        truss=str(bundle.path), truss_version=env.version, examples=results, findings=findings,
        server_loaded=loaded, rtol=rtol, atol=atol, seconds=time.perf_counter() - t0,
    )


def _named_inputs(inputs: Iterable[Any] | None, examples: list[Any]) -> list[tuple[str, Any]]:
    """What a check sends: the given inputs (named input0, input1, ...), else every example."""
    if inputs is not None:
        return [(f"input{i}", x) for i, x in enumerate(inputs)]
    return [(e.name, e.input) for e in examples]


def _compare_all(examples: list[tuple[str, Any]], truss_url: str | None, live, rtol: float, atol: float) -> list[ExampleResult]:
    """Every example to the Truss server at `truss_url` and to `live` served here for the while."""
    server = live.serve()
    try:
        return [_compare(name, x, truss_url, server.url, live, rtol, atol) for name, x in examples]
    finally:
        server.stop()
        servers = getattr(live, "_servers", [])  # a model in this process keeps a list of its servers
        if server in servers:
            servers.remove(server)


def _named(chainlet: str, findings: Iterable[Finding]) -> list[Finding]:
    """`findings` of one chainlet, each message led by its name."""
    return [replace(f, message=f"{chainlet}: {f.message}") for f in findings]


def _server_site(env) -> Path | None:
    found = list((env.root / "venv-server" / "lib").glob("python*/site-packages"))
    return found[0] if found else None


def _send(client, x: Any) -> tuple[int, str, bytes, bool, float]:
    t0 = time.perf_counter()
    with client.stream("POST", PREDICT, content=json.dumps(x).encode()) as r:
        body = r.read()
        streamed = "content-length" not in r.headers and r.headers.get("transfer-encoding") == "chunked"
        return r.status_code, r.headers.get("content-type", ""), body, streamed, (time.perf_counter() - t0) * 1000


def _compare(name: str, x: Any, truss_url: str | None, lab_url: str, live, rtol: float, atol: float) -> ExampleResult:
    import httpx

    with httpx.Client(base_url=lab_url, timeout=600) as client:
        before = len(live.traces)
        l_status, l_type, l_body, l_streamed, _ = _send(client, x)
        traces = live.traces[before:]
    stages = {}
    if traces:
        t = traces[-1]
        stages = {"pre": t.pre_ms, "predict": t.predict_ms, "post": t.post_ms, "lock_wait": t.lock_wait_ms}
    if truss_url is None:
        return ExampleResult(name, x, False, None, l_status, "the Truss server did not load the model", None, stages, l_streamed)
    with httpx.Client(base_url=truss_url, timeout=600) as client:
        t_status, t_type, t_body, t_streamed, t_ms = _send(client, x)
    difference = None
    if t_status != l_status:
        difference = f"status: Truss {t_status} vs truss_lab {l_status}"
    elif t_streamed != l_streamed:
        difference = f"streamed: Truss {t_streamed} vs truss_lab {l_streamed}"
    elif t_status < 400:
        difference = _body_difference(t_type, t_body, l_body, rtol, atol)
    return ExampleResult(name, x, difference is None, t_status, l_status, difference, t_ms, stages, t_streamed)


def _body_difference(content_type: str, a: bytes, b: bytes, rtol: float, atol: float) -> str | None:
    if content_type.startswith("application/json"):
        try:
            ja, jb = json.loads(a), json.loads(b)
        except ValueError:
            return None if a == b else "body: differs (not JSON)"
        found = first_difference(ja, jb, rtol, atol)
        return None if found is None else f"{found[0] or '<body>'}: Truss {short_json(found[1], 80)} vs truss_lab {short_json(found[2], 80)}"
    if a != b:
        return f"body: Truss {short_json(a, 80)} vs truss_lab {short_json(b, 80)}"
    return None


def _load_failure(log: str, requirements: list[str], bundle: Bundle) -> list[Finding]:
    """Why the Truss server could not load the model, from its log: a missing module named as such."""
    missing = re.findall(r"ModuleNotFoundError: No module named '([^']+)'", log)
    if missing:
        name = missing[-1].split(".")[0]
        return [Finding("error", "requirement", f"on the Truss server, `import {name}` failed: No module named '{name}'",
                        f"add the package that provides `{name}` to `requirements` in {bundle.config_path.name} "
                        f"(requirements now: {', '.join(requirements) or 'none'})")]
    tail = [line for line in log.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    return [Finding("error", "server-load", f"the Truss server could not load the model: {tail[0].strip()[:300]}",
                    "fix the error above; `truss-lab check` shows the server's log line")]


def _lock_findings(live, n: int) -> list[Finding]:
    found: dict[str, Finding] = {}
    for t in live.traces[-max(n, 1) * 2:]:
        for f in t.findings:
            if f.kind not in found:
                found[f.kind] = Finding("warning", "lock", f.message, "keep predict to GPU work: " + f.message.split(" — ")[-1])
    return list(found.values())


def main_check(path: str, inputs: list[Any] | None, as_json: bool, truss_version: str | None, rtol: float,
               make_model: Callable[[Path], Any], make_chain: Callable[[Path], Any] | None = None) -> int:
    """`truss-lab check` (cli.py): print the report; 0 when everything matches and no finding is an error."""
    try:
        if path.endswith(".py") and Path(path).is_file():  # a Truss Chain's source
            report = check_chain(path, inputs, make_chain=make_chain, truss_version=truss_version, rtol=rtol)
        else:
            report = check(path, inputs, make_model=make_model, truss_version=truss_version, rtol=rtol)
    except TrussLabError as exc:
        print(f"truss-lab check: {exc}", file=sys.stderr)
        return 2
    print(report.to_json() if as_json else str(report))
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------------------ chains

_TRUSS_REQUIREMENT = re.compile(r"^truss\s*(?:[=<>!~].*)?$")


def chainlet_requirements(bundle: Bundle) -> list[str]:
    """What a chainlet's Truss server needs installed on top of its own: its requirements but the `truss`
    pin (the server's own Truss version stands in for it, appended to its path)."""
    return [r for r in _requirements(bundle) if not _TRUSS_REQUIREMENT.match(r)]


@dataclass
class RealChain:
    """A chain's chainlets on real Truss servers (on_truss_servers): the entrypoint's URL, None when a
    chainlet failed to load (the findings say which and why)."""

    entry_url: str | None
    findings: list[Finding]
    servers: list[Any]


@contextlib.contextmanager
def on_truss_servers(chain: Any, env: Any, note: Callable[[str], None] | None = None) -> Iterator[RealChain]:
    """Every chainlet's generated truss of a loaded Chain on the real Truss server (each with its own
    requirements), started dependencies first and wired the way a deployed chain finds its chainlets:
    the `dynamic_chainlet_config` the platform mounts, here a folder. Stops them all on leaving.
    `truss-lab check my_chain.py` sends the examples to it; bench_chain times the same requests."""
    import shutil
    import tempfile

    from .truss_server import cli_site

    mount = Path(tempfile.mkdtemp(prefix="truss-lab-chain-config-"))
    site = cli_site(env)
    real = RealChain(None, [], [])
    urls: dict[str, dict[str, str]] = {}
    try:
        for name, live in chain.chainlets.items():  # dependencies first: a chainlet reads its dependencies' URLs at start
            bundle = live.bundle
            requirements = _requirements(bundle)
            for pin in (r for r in requirements if _TRUSS_REQUIREMENT.match(r)):
                if pin.replace(" ", "") not in (f"truss=={env.version}", "truss"):
                    real.findings.append(Finding("warning", "requirement", f"{name}: the chainlet pins {pin}; the check runs Truss {env.version}",
                                                 f"check with --truss-version matching {pin}"))
            overlay = env.requirements_overlay(chainlet_requirements(bundle), note=note)
            (mount / "dynamic_chainlet_config").write_text(json.dumps(urls))
            server_env = {"TRUSS_LAB_DYNAMIC_CONFIG_DIR": str(mount), "TRUSS_SECRET_baseten_chain_api_key": "truss-lab-local"}
            if site is not None:
                server_env["TRUSS_LAB_APPEND_PATH"] = str(site)  # the chainlet's `truss` requirement, after the server's own packages
            if overlay is not None:
                server_env["PYTHONPATH"] = str(overlay / "site")
            server = env.start(bundle.path, env=server_env, timeout=600)
            real.servers.append(server)
            if not server.wait_ready(1):
                real.findings.extend(_named(name, _load_failure(server.output(), requirements, bundle)))
                break
            urls[name] = {"predict_url": f"{server.url}{PREDICT}"}
        else:
            real.entry_url = real.servers[-1].url if real.servers else None
        yield real
    finally:
        for server in reversed(real.servers):
            server.stop()
        shutil.rmtree(mount, ignore_errors=True)


def check_chain(
    chain: str | os.PathLike | Any,
    inputs: Iterable[Any] | None = None,
    *,
    make_chain: Callable[[Path], Any] | None = None,
    truss_version: str | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
    note: Callable[[str], None] | None = None,
) -> CheckReport:
    """`truss-lab check my_chain.py`: the chain on real Truss servers, as deployed (on_truss_servers),
    then the chain's examples (or `inputs`) sent to the real entrypoint and to truss_lab's, and the
    answers compared.
    `chain`: a loaded Chain, or its source loaded with `make_chain(path)` (the CLI passes load_chain)."""
    import warnings

    from .truss_server import TRUSS_VERSION, ServerEnv

    t0 = time.perf_counter()
    owned = isinstance(chain, (str, os.PathLike))
    if owned and make_chain is None:
        raise TrussLabError("check_chain() of a source file needs make_chain (truss-lab check passes truss_lab.load_chain)")
    env = ServerEnv.ensure(truss_version or TRUSS_VERSION, note=note)
    if owned:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chain = make_chain(Path(chain))
    findings: list[Finding] = []
    results: list[ExampleResult] = []
    examples = _named_inputs(inputs, chain.examples)
    if not examples:
        findings.append(Finding("warning", "examples", "no examples to send: only the chainlets' loads were checked",
                                f"add examples to {chain.examples_file.name} next to the chain, or pass inputs (--input JSON)"))
    loaded = True
    try:
        with on_truss_servers(chain, env, note=note) as real:
            findings.extend(real.findings)
            loaded = real.entry_url is not None
            results = _compare_all(examples, real.entry_url, chain.entry, rtol, atol)
        for name, live in chain.chainlets.items():
            findings.extend(_named(name, _lock_findings(live, len(examples))))
    finally:
        if owned:
            chain.close()
    return CheckReport(
        truss=str(chain.source), truss_version=env.version, examples=results, findings=findings,
        server_loaded=loaded, rtol=rtol, atol=atol, seconds=time.perf_counter() - t0,
    )
