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

import ast
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..bundle import Bundle, read_bundle
from ..errors import TrussLabError
from ..jsondiff import ATOL, RTOL, first_difference, short_json

PREDICT = "/v1/models/model:predict"
__all__ = ["CheckReport", "ExampleResult", "Finding", "check", "first_difference", "lint"]


@dataclass
class Finding:
    """One thing that would go wrong (error) or differently (warning) on deploy."""

    severity: str  # "error" | "warning"
    kind: str  # requirement | async-load | python-version | secret | data-file | env-var | lock | server-load
    message: str
    fix: str
    location: str | None = None  # file:line

    def line(self) -> str:
        where = f"{self.location}: " if self.location else ""
        return f"{self.severity}: {where}{self.message} — {self.fix}"


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
    examples = [(f"input{i}", x) for i, x in enumerate(inputs)] if inputs is not None else \
        [(e.name, e.input) for e in bundle.examples]
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
            server = live.serve()
            try:
                for name, x in examples:
                    results.append(_compare(name, x, oracle.url if loaded else None, server.url, live, rtol, atol))
            finally:
                server.stop()
                if server in live._servers:
                    live._servers.remove(server)
        findings.extend(_lock_findings(live, len(examples)))
    finally:
        if owned:
            live.close()
    return CheckReport(
        truss=str(bundle.path), truss_version=env.version, examples=results, findings=findings,
        server_loaded=loaded, rtol=rtol, atol=atol, seconds=time.perf_counter() - t0,
    )


def _requirements(bundle: Bundle) -> list[str]:
    reqs = list(bundle.requirements)
    req_file = bundle.config.get("requirements_file")
    if req_file:
        path = bundle.path / str(req_file)
        if path.is_file():
            reqs += [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [r for r in reqs if r]


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


# ------------------------------------------------------------------------------------------ lints


def lint(bundle: Bundle, env_python: str | None = None, server_site: Path | None = None) -> list[Finding]:
    """What only fails on deploy, read from the truss's code and config (nothing is run)."""
    files = [p for folder in (bundle.model_dir, bundle.packages_dir) if folder.is_dir()
             for p in sorted(folder.rglob("*.py")) if "__pycache__" not in p.parts]
    trees: list[tuple[Path, ast.AST]] = []
    for path in files:
        try:
            trees.append((path, ast.parse(path.read_bytes(), filename=str(path))))
        except SyntaxError:
            continue  # the load itself reports it
    findings: list[Finding] = []
    findings += _lint_imports(bundle, trees, server_site)
    findings += _lint_async_load(bundle, trees)
    if env_python and bundle.python_version and bundle.python_version != env_python:
        findings.append(Finding("warning", "python-version",
                                f"config.yaml asks for python_version {bundle.python_version}; this check's Truss server runs {env_python}",
                                f"deploy and check on the same Python: set python_version: {env_python}, or check with that Python",
                                f"{bundle.config_path.name}"))
    findings += _lint_secrets(bundle, trees)
    findings += _lint_data_files(bundle, trees)
    findings += _lint_env_vars(bundle, trees)
    return findings


def _where(bundle: Bundle, path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(bundle.path.parent)}:{getattr(node, 'lineno', 1)}"


def _local_names(bundle: Bundle) -> set[str]:
    names = {Path(bundle.model_module_dir).parts[0]}
    for folder in (bundle.packages_dir, bundle.model_dir):
        if folder.is_dir():
            names |= {p.stem for p in folder.iterdir() if p.suffix == ".py" or p.is_dir()}
    return names


def requirement_names(requirements: list[str]) -> tuple[set[str], list[str]]:
    """(the distribution names the requirements name, the URL/path ones whose name is only a guess).

    `tqdm>=4`, `name[extra] @ https://...` and `-e git+https://...#egg=name` name their package; a bare
    `git+https://host/org/mylib.git` or a wheel URL names none until installed: its name is guessed
    from the URL (`mylib`), and the lint only warns about imports it might provide."""
    names: set[str] = set()
    opaque: list[str] = []
    for raw in requirements:
        req = re.sub(r"^(-e|--editable)\s+", "", raw.strip())
        egg = re.search(r"#.*\begg=([A-Za-z0-9._-]+)", req)
        named = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*@", req)
        if egg:
            names.add(_norm(egg.group(1)))
        elif named:
            names.add(_norm(named.group(1)))
        elif "://" in req or req.startswith(("git+", ".", "/")) or re.search(r"\.(whl|zip|tar\.gz|tgz)$", req):
            last = req.split("#")[0].split("?")[0].rstrip("/").rsplit("/", 1)[-1]
            last = re.sub(r"\.git$", "", last)
            if last.endswith(".whl"):
                last = last.split("-")[0]
            else:
                last = re.sub(r"(-\d[\w.]*)?(\.tar\.gz|\.tgz|\.zip)$", "", last)
            names.add(_norm(last))
            opaque.append(raw.strip())
        else:
            names.add(_norm(re.split(r"[<>=!~;\[ @]", req, maxsplit=1)[0]))
    return names, opaque


def _lint_imports(bundle: Bundle, trees, server_site: Path | None) -> list[Finding]:
    import importlib.metadata as md

    local = _local_names(bundle)
    required, opaque = requirement_names(_requirements(bundle))
    dists = md.packages_distributions()
    on_server = {p.name.split("-")[0].split(".")[0] for p in server_site.iterdir()} if server_site else set()
    seen: set[str] = set()
    out = []
    for path, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for full in names:
                top = full.split(".")[0]
                if top in seen or top in local or top in sys.stdlib_module_names or top in on_server or top == "truss_lab":
                    continue
                providers = {_norm(d) for d in dists.get(top, [])} | {_norm(top)}
                if any(req in providers or req.startswith(_norm(top)) for req in required):
                    continue
                seen.add(top)
                provider = sorted(dists.get(top, [top]))[0]
                if opaque:  # cannot be sure: a URL requirement may well provide it
                    out.append(Finding("warning", "requirement",
                                       f"`import {top}` is not covered by a named requirement; it may come from {opaque[0]}"
                                       f"{f' (or {len(opaque) - 1} other URL requirements)' if len(opaque) > 1 else ''}, "
                                       "whose modules are known only once it is installed",
                                       f"if it does not, add `{provider}` to requirements in {bundle.config_path.name}",
                                       _where(bundle, path, node)))
                    continue
                out.append(Finding("error", "requirement",
                                   f"`import {top}` is not covered by `requirements` (and the Truss server's own environment lacks it)",
                                   f"add `{provider}` to requirements in {bundle.config_path.name}", _where(bundle, path, node)))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def _model_class(bundle: Bundle, trees) -> tuple[Path, ast.ClassDef] | None:
    for path, tree in trees:
        if path == bundle.model_file:
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name == bundle.model_class_name:
                    return path, node
    return None


def _lint_async_load(bundle: Bundle, trees) -> list[Finding]:
    found = _model_class(bundle, trees)
    if found is None:
        return []
    path, cls = found
    for node in cls.body:
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "load":
            return [Finding("error", "async-load", "`async def load` is never awaited by the Truss server: its body does not run on deploy",
                            "make it a plain `def load(self)` (run async setup with asyncio.run inside it)", _where(bundle, path, node))]
    return []


def _string_key(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _named(node: ast.AST, *words: str) -> bool:
    text = ast.unparse(node).lower()
    return any(w in text for w in words)


def _lint_secrets(bundle: Bundle, trees) -> list[Finding]:
    declared = set(bundle.secrets)
    out, seen = [], set()
    for path, tree in trees:
        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Subscript) and _named(node.value, "secret"):
                key = _string_key(node.slice)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                    and _named(node.func.value, "secret") and node.args:
                key = _string_key(node.args[0])
            if key and key not in declared and key not in seen:
                seen.add(key)
                out.append(Finding("error", "secret", f"secret {key!r} is read but not declared under `secrets` in config.yaml",
                                   f"add `{key}: null` under secrets (and set its value in your Baseten secrets)", _where(bundle, path, node)))
    return out


_READERS = ("open", "load", "read", "loadtxt", "genfromtxt", "imread", "from_file", "load_model", "from_pretrained", "fromfile")


def _data_path(node: ast.AST) -> list[str] | None:
    """The parts of a `data_dir / "a" / "b.npy"` chain (["a", "b.npy"]), None if it is not one or any
    part is not a constant."""
    parts: list[str] = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        part = _string_key(node.right)
        if part is None:
            return None
        parts.insert(0, part)
        node = node.left
    root = ast.unparse(node).split(".")[-1].lower()
    return parts if parts and root.strip("_") in ("data_dir", "datadir", "data_path", "data") else None


def _lint_data_files(bundle: Bundle, trees) -> list[Finding]:
    out, seen = [], set()
    for path, tree in trees:
        inner = set()  # a chain's own left-hand sides (data_dir / "weights" in data_dir / "weights" / "w.npy")
        read = set()  # chains passed straight to a reader: open(...), np.load(...), ...
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                inner.add(id(node.left))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("read_bytes", "read_text", "open") and not node.args:
                read.add(id(node.func.value))  # (data_dir / "x").read_bytes()
            if isinstance(node, ast.Call) and node.args:
                func = ast.unparse(node.func).split(".")[-1]
                mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
                writes = func == "open" and isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax")
                if any(func.startswith(r) for r in _READERS) and not writes:
                    read.add(id(node.args[0]))
        for node in ast.walk(tree):
            if id(node) in inner:
                continue
            parts = _data_path(node)
            if parts is None:
                continue
            name = "/".join(parts)
            if name in seen or any(ch in name for ch in "*?{"):
                continue
            seen.add(name)
            if (bundle.data_dir / name).exists():
                continue
            where = _where(bundle, path, node)
            if id(node) in read:
                out.append(Finding("error", "data-file", f"`{ast.unparse(node)}` is read but {bundle.data_dir_name}/{name} is not in the truss",
                                   f"put {name} in {bundle.data_dir_name}/ (only data/ is deployed)", where))
            else:  # maybe a file the model writes itself (a cache): cannot be sure
                out.append(Finding("warning", "data-file",
                                   f"`{ast.unparse(node)}`: {bundle.data_dir_name}/{name} is not in the truss "
                                   "(fine if the model writes it itself; this lint cannot tell how the path is used)",
                                   f"if the model reads it, put {name} in {bundle.data_dir_name}/ (only data/ is deployed)", where))
    return out


def _lint_env_vars(bundle: Bundle, trees) -> list[Finding]:
    declared = set(bundle.environment_variables)
    out, seen = [], set()
    for path, tree in trees:
        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
                key = _string_key(node.slice)
            elif isinstance(node, ast.Call) and node.args and ast.unparse(node.func) in ("os.environ.get", "environ.get", "os.getenv", "getenv"):
                key = _string_key(node.args[0])
            if key and key not in declared and key not in seen and not key.startswith("TRUSS_SECRET_"):
                seen.add(key)
                in_kernel = " (it is set in this process only)" if key in os.environ else ""
                out.append(Finding("warning", "env-var", f"environment variable {key} is read but not set in `environment_variables`{in_kernel}",
                                   "add it under environment_variables in config.yaml if the model needs it on deploy",
                                   _where(bundle, path, node)))
    return out


def main_check(path: str, inputs: list[Any] | None, as_json: bool, truss_version: str | None, rtol: float,
               make_model: Callable[[Path], Any]) -> int:
    """`truss-lab check` (cli.py): print the report; 0 when everything matches and no finding is an error."""
    try:
        report = check(path, inputs, make_model=make_model, truss_version=truss_version, rtol=rtol)
    except TrussLabError as exc:
        print(f"truss-lab check: {exc}", file=sys.stderr)
        return 2
    print(report.to_json() if as_json else str(report))
    return 0 if report.ok else 1
