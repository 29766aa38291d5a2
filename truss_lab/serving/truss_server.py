"""The real Truss server, run here without Docker: the oracle truss_lab's semantics are checked against.

The `truss` package on PyPI ships its server (`truss_server.py`, `model_wrapper.py`, helpers) and
writes it into an image's build context. This module does what the image would, with no Docker:

1. a venv with `truss==<pin>` ("cli"); `truss image build-context` writes the server code once;
2. a second venv with the server's own `requirements.txt` / `constraints.txt` ("server": numpy < 2,
   an older FastAPI - never truss_lab's own environment);
3. one app folder per truss laid out as the image's `APP_HOME` (`server/*`, `model/`, `data/`,
   `config.yaml` as Truss writes it, with every default filled in; `packages/` on the path), and
   the server's FastAPI app started by uvicorn on 127.0.0.1 from a small launcher (its `main.py`
   binds 0.0.0.0).

Both venvs are made once and cached under `cache_dir()` (`$TRUSS_LAB_CACHE`, else
`~/.cache/truss_lab`), so only the first use pays the install (about a minute each).

    env = ServerEnv.ensure()                     # venvs + server code, cached
    with env.start("my-truss") as server:        # a real Truss server on 127.0.0.1
        httpx.post(server.url + "/v1/models/model:predict", json=...)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import URLError
from urllib.request import urlopen

from ..errors import TrussLabError

TRUSS_VERSION = "0.18.36"  # the pinned server: every parity claim in docs/parity.md is against this version

# Runs inside the server's venv, with the app folder as the working directory (as APP_HOME is).
LAUNCHER = """\
import asyncio, os, sys
app_home = os.getcwd()
sys.path.insert(0, app_home)                       # the image runs `python3 /app/main.py`
packages = os.path.join(app_home, "packages")
if os.path.isdir(packages):
    sys.path.append(packages)                      # the image's /packages
for extra_path in filter(None, os.environ.get("TRUSS_LAB_APPEND_PATH", "").split(os.pathsep)):
    sys.path.append(extra_path)                    # after everything the image has: a chainlet's `truss` package
dynamic = os.environ.get("TRUSS_LAB_DYNAMIC_CONFIG_DIR")
if dynamic:                                        # the platform's /etc/b10_dynamic_config mount, here a folder
    import importlib
    for name in ("_truss_shared.dynamic_config_resolver", "truss.templates.shared.dynamic_config_resolver"):
        try:
            importlib.import_module(name).DYNAMIC_CONFIG_MOUNT_DIR = dynamic
        except ImportError:
            pass
import uvicorn
from truss_server import TrussServer

port = int(sys.argv[1])
server = TrussServer(port, "config.yaml")
app = server.create_application()
transport = server._config["runtime"].get("transport", {}) or {}
extra = {}                                         # as TrussServer.start() passes them (only when set)
if transport.get("ping_interval_seconds"):
    extra["ws_ping_interval"] = transport["ping_interval_seconds"]
if transport.get("ping_timeout_seconds"):
    extra["ws_ping_timeout"] = transport["ping_timeout_seconds"]
config = uvicorn.Config(app, host="127.0.0.1", port=port, http="h11", workers=1,
                        log_level="warning", timeout_graceful_shutdown=3, **extra)
server._server = uvicorn.Server(config=config)
asyncio.run(server._server.serve())
"""

# Runs inside the cli venv: Truss's own config normalisation (every default filled in).
NORMALISE = """\
import sys, pathlib
from truss.base.truss_config import TrussConfig
TrussConfig.from_yaml(pathlib.Path(sys.argv[1])).write_to_yaml_file(pathlib.Path(sys.argv[2]))
"""


def cache_dir() -> Path:
    root = os.environ.get("TRUSS_LAB_CACHE") or Path.home() / ".cache" / "truss_lab"
    return Path(root).expanduser()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise TrussLabError(f"{what} failed (exit {out.returncode}): " + " | ".join(tail))
    return out


def _install(cmd: list[str], what: str) -> None:
    """A pip install with a progress line on stderr (elapsed time and pip's latest step); its last lines
    in a one-line TrussLabError if it fails."""
    from tqdm import tqdm

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    try:
        with tqdm(desc=what, bar_format="{desc}: {elapsed} {postfix}", file=sys.stderr, leave=False) as bar:
            for line in proc.stdout:
                line = line.strip()
                if line:
                    tail = (tail + [line])[-5:]
                    if line.startswith(("Collecting", "Downloading", "Installing", "Successfully")):
                        bar.set_postfix_str(line[:70])
    except BaseException:  # Ctrl-C (a kernel interrupt reaches only this process): pip stops too
        _stop(proc)
        raise
    if proc.wait() != 0:
        raise TrussLabError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def _exclusive(lock_file: Path, say: Callable[[str], None] | None = None):
    """Hold an advisory lock on `lock_file` (across processes: two kernels, a kernel and a terminal)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): one check at a time is then up to the user
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say is not None:
                say(f"truss_lab: waiting for another check that is preparing {lock_file.stem}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(final: Path, build: Callable[[Path], None], say: Callable[[str], None] | None = None) -> Path:
    """`final`, built by `build(folder)` once: into a private folder renamed into place when complete,
    under a lock, so concurrent checks never see (or break) a half-built folder, and an interrupted
    build leaves nothing behind."""
    if (final / ".ready").is_file():
        return final
    with _exclusive(final.parent / f".{final.name}.lock", say):
        if (final / ".ready").is_file():  # another check built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
        try:
            build(tmp)
            (tmp / ".ready").write_text("ok")
            if final.exists():  # left half-built by a run killed before this lock existed
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@dataclass
class ServerEnv:
    """The cached venvs and server code of one pinned Truss version."""

    root: Path
    version: str

    @property
    def cli_python(self) -> Path:
        return self.root / "venv-cli" / "bin" / "python"

    @property
    def server_python(self) -> Path:
        return self.root / "venv-server" / "bin" / "python"

    @property
    def server_code(self) -> Path:
        return self.root / "build" / "server"

    @property
    def ready(self) -> bool:
        return (self.root / ".ready").is_file()

    @classmethod
    def ensure(cls, version: str = TRUSS_VERSION, note: Callable[[str], None] | None = None) -> "ServerEnv":
        """The environment for `version`, made now if it is not cached (a few minutes, once)."""
        env = cls(cache_dir() / f"truss-{version}", version)
        if env.ready:
            return env
        say = note or (lambda msg: print(msg, file=sys.stderr, flush=True))
        env.root.mkdir(parents=True, exist_ok=True)
        with _exclusive(env.root / ".install.lock", say):  # venvs are not relocatable: built in place, one at a time
            if not env.ready:
                env._install(say)
        return env

    def _install(self, say: Callable[[str], None]) -> None:
        env, version = self, self.version
        say(f"truss_lab: installing the Truss {version} server once, into {env.root} (about two minutes)")
        if not env.cli_python.exists():
            _run([sys.executable, "-m", "venv", str(env.cli_python.parent.parent)], "creating the truss venv")
        _install([str(env.cli_python), "-m", "pip", "install", "--progress-bar", "off", f"truss=={version}"], f"pip install truss=={version}")
        seed = env.root / "seed"
        shutil.rmtree(seed, ignore_errors=True)
        (seed / "model").mkdir(parents=True)
        (seed / "model" / "model.py").write_text("class Model:\n    def predict(self, x):\n        return x\n")
        (seed / "config.yaml").write_text("model_name: seed\n")
        shutil.rmtree(env.root / "build", ignore_errors=True)
        truss_cli = env.cli_python.parent / "truss"
        _run([str(truss_cli), "image", "build-context", str(env.root / "build"), str(seed)], "truss image build-context")
        if not env.server_python.exists():
            _run([sys.executable, "-m", "venv", str(env.server_python.parent.parent)], "creating the server venv")
        reqs, cons = env.server_code / "requirements.txt", env.server_code / "constraints.txt"
        _install([str(env.server_python), "-m", "pip", "install", "--progress-bar", "off", "-r", str(reqs), "-c", str(cons)],
                 "installing the Truss server's requirements")
        (env.root / ".ready").write_text(version)

    # ---------------------------------------------------------------------------------- requirements

    def requirements_overlay(self, requirements: list[str], note: Callable[[str], None] | None = None) -> Path | None:
        """A folder with the truss's own `requirements` installed (cached by their hash), put in front of
        the server's packages on PYTHONPATH - as the image's `pip install` of them after the server's
        own requirements would. None when there are none. A requirement that cannot be installed is a
        TrussLabError naming it."""
        folder = self.overlay_folder(requirements)
        if folder is None or (folder / ".ready").is_file():
            return folder
        reqs = _normalised(requirements)
        say = note or (lambda msg: print(msg, file=sys.stderr, flush=True))

        def build(tmp: Path) -> None:
            say(f"truss_lab: installing the truss's requirements into the Truss server's environment, once "
                f"(cached in {folder}): {', '.join(reqs)}")
            (tmp / "requirements.txt").write_text("\n".join(reqs) + "\n")
            _install([str(self.server_python), "-m", "pip", "install", "--progress-bar", "off", "--target", str(tmp / "site"),
                      "-r", str(tmp / "requirements.txt"), "-c", str(self.server_code / "constraints.txt")],
                     f"pip install of the truss's requirements ({', '.join(reqs)})")

        folder.parent.mkdir(parents=True, exist_ok=True)
        return build_once(folder, build, say)

    def overlay_folder(self, requirements: list[str]) -> Path | None:
        """Where the overlay for these requirements is cached (ready once it holds `.ready`); None for none."""
        reqs = _normalised(requirements)
        return self.root / "requirements" / hashlib.sha1("\n".join(reqs).encode()).hexdigest()[:16] if reqs else None

    @property
    def python_version(self) -> str:
        """The server's Python as config.yaml spells it, e.g. 'py311'."""
        return f"py{sys.version_info.major}{sys.version_info.minor}"

    # ---------------------------------------------------------------------------------- apps

    def app_folder(self, truss_dir: str | os.PathLike, apps: Path | None = None) -> Path:
        """The truss laid out as the image's APP_HOME (rebuilt when the truss's files change)."""
        src = Path(truss_dir).resolve()
        if not (src / "config.yaml").is_file():
            raise TrussLabError(f"{src}: not a Truss folder (no config.yaml)")
        digest = _tree_digest(src)
        app = (apps or self.root / "apps") / f"{src.name}-{digest[:12]}"
        if (app / ".ready").is_file():
            return app
        import yaml

        raw = yaml.safe_load((src / "config.yaml").read_text()) or {}

        def build(tmp: Path) -> None:
            for item in self.server_code.iterdir():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            for key, default in (("model_module_dir", "model"), ("data_dir", "data"), ("bundled_packages_dir", "packages")):
                folder = src / str(raw.get(key) or default)
                if folder.is_dir():
                    shutil.copytree(folder, tmp / ("packages" if key == "bundled_packages_dir" else str(raw.get(key) or default)),
                                    ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
            _run([str(self.cli_python), "-c", NORMALISE, str(src / "config.yaml"), str(tmp / "config.yaml")],
                 f"{src / 'config.yaml'}: Truss could not read it")

        app.parent.mkdir(parents=True, exist_ok=True)
        return build_once(app, build)

    def start(self, truss_dir: str | os.PathLike, *, env: dict[str, str] | None = None,
              timeout: float = 120.0, apps: Path | None = None, wait: bool = True) -> "RunningServer":
        """Start the real Truss server on the truss at `truss_dir`; returns once it is ready (or failed),
        or with `wait=False` as soon as it answers liveness (while load() may still run)."""
        import yaml

        app = self.app_folder(truss_dir, apps)
        port = _free_port()
        logs = app.parent / ".logs"  # one log per run: two checks of one truss may share its app folder
        logs.mkdir(exist_ok=True)
        for old in sorted(logs.glob("*.log"), key=lambda p: p.stat().st_mtime)[:-50]:  # keep the latest 50
            old.unlink(missing_ok=True)
        fd, log_name = tempfile.mkstemp(dir=logs, prefix=f"{app.name}-", suffix=".log")
        os.close(fd)
        log = Path(log_name)
        # The platform sets config.yaml's environment_variables in the container (not the server): so do
        # we. Nothing else of this process's environment goes in - a variable set only in the notebook's
        # kernel is not set on deploy either - except what a process needs to run, and TRUSS_SECRET_*
        # (the secret manager's stand-in here).
        declared = (yaml.safe_load((app / "config.yaml").read_text()) or {}).get("environment_variables") or {}
        base = {k: v for k, v in os.environ.items() if k in _PASSED or k.startswith("TRUSS_SECRET_")}
        proc_env = dict(base, **{str(k): str(v) for k, v in declared.items()}, **(env or {}))
        proc_env.pop("PYTHONHOME", None)
        with log.open("w") as out:
            proc = subprocess.Popen([str(self.server_python), "-c", LAUNCHER, str(port)], cwd=app,
                                    stdout=out, stderr=subprocess.STDOUT, env=proc_env)
        server = RunningServer(proc, f"http://127.0.0.1:{port}", app, log)
        try:
            server.wait_live(timeout) if not wait else server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server


@dataclass
class RunningServer:
    """A real Truss server process on 127.0.0.1 (a context manager: leaving it stops the server)."""

    proc: subprocess.Popen
    url: str
    app: Path
    log: Path

    def wait_ready(self, timeout: float) -> bool:
        """Wait for load() to finish (200 on /v1/models/model/loaded: readiness would also ask the model's
        is_healthy); False when load() failed (the server exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # a failed load() shuts the real server down
            try:
                with urlopen(f"{self.url}/v1/models/model/loaded", timeout=2) as r:
                    if r.status == 200:
                        return True
            except URLError as exc:
                if getattr(exc, "code", None) not in (None, 503):
                    return False
            except (ConnectionError, OSError):
                pass
            time.sleep(0.05)
        raise TrussLabError(f"the Truss server for {self.app.name} was not ready within {timeout:g} s; see {self.log}")

    def wait_live(self, timeout: float) -> None:
        """Wait until the server answers `GET /` (load() may still be running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urlopen(f"{self.url}/", timeout=2):
                    return
            except (URLError, ConnectionError, OSError):
                time.sleep(0.05)
        raise TrussLabError(f"the Truss server for {self.app.name} did not answer within {timeout:g} s; see {self.log}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_PASSED = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "SYSTEMROOT", "TRUSS_LAB_CACHE"}


def cli_site(env: ServerEnv) -> Path | None:
    """The site-packages of the venv with `truss` installed (what a chainlet's `truss==<pin>` requirement installs)."""
    found = list((env.root / "venv-cli" / "lib").glob("python*/site-packages"))
    return found[0] if found else None


def _normalised(requirements: list[str]) -> list[str]:
    return sorted({r.strip() for r in requirements if r.strip() and not r.strip().startswith("#")})


def _tree_digest(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    """`python -m truss_lab.serving.truss_server`: make (or find) the cached Truss server environment
    (`python -m truss_lab.serving.prepare PATH` also installs what checking those trusses needs)."""
    env = ServerEnv.ensure()
    print(f"Truss {env.version} server ready: {env.server_python}")


if __name__ == "__main__":
    main()
