"""A chain's trusses, as Truss's own code generation writes them for a push (generate only: nothing
leaves the machine): one truss per chainlet, its generated `TrussChainletModel`, stubs and pydantic I/O.

Generation imports the chain's source, fills truss_chains' registry, writes under tempfile's folder
and runs `ruff`: none of that happens in the kernel. It runs in a generator process of its own
(`python -m truss_lab.chain_gen`), started once and kept warm (the libraries the chain imports stay
imported there, so a save regenerates in milliseconds), which ends with the kernel (its stdin's
end-of-file). The kernel never imports the chain's source: `from my_chain import Entry` and
`chains.run_local()` work next to `load_chain`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

from .errors import LoadError, TrussLabError, describe, user_location


@dataclasses.dataclass
class _Generated:
    """What Truss's code generation wrote for one version of the chain's source."""

    name: str
    order: list[str]  # dependencies first, the entrypoint last
    depends: dict[str, tuple[str, ...]]  # chainlet -> the chainlets it calls
    folders: dict[str, Path]  # chainlet -> its generated truss
    classes: dict[str, tuple[str, str]]  # chainlet -> (module, class name) in the chain root
    data_dirs: dict[str, Path] = dataclasses.field(default_factory=dict)  # chainlet -> its remote_config's data_dir
    truss_dirs: dict[str, Path] = dataclasses.field(default_factory=dict)  # a TrussChainlet -> its truss folder


def generate(source: Path, entrypoint: str | None, root: Path, *, link: bool = False) -> _Generated:
    """Every chainlet's truss under `root`, as a push writes it, generated in the generator process.
    `link`: files copied from the chain's folder are hard links to them (a scratch generation that is
    only compared with the live one: a save costs what it changed, not the size of `data/`). A file
    truss_chains refuses is one TrussLabError line naming it; the chain's code failing to import is a
    LoadError at its file:line."""
    return _GENERATOR.run(Path(source), entrypoint, Path(root), link)


class _Generator:
    """The generator process: one per kernel, started on first use, restarted if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def run(self, source: Path, entrypoint: str | None, root: Path, link: bool) -> _Generated:
        with self._lock:
            for attempt in (1, 2):
                proc = self._start()
                try:
                    pickle.dump((source, entrypoint, root, link), proc.stdin)
                    proc.stdin.flush()
                    answer = pickle.load(proc.stdout)
                    break
                except (EOFError, OSError, pickle.UnpicklingError):
                    code = self._stop()
                    if attempt == 2:
                        raise TrussLabError(f"{source}: the code generation process died (exit code {code})") from None
                except BaseException:  # interrupted mid-answer: this process's stream is out of step
                    self._stop()
                    raise
        if answer[0] == "ok":
            return answer[1]
        _, message, location = answer
        raise LoadError(message, location=location) if location else TrussLabError(message)

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            # nothing written into the user's folders: ruff's cache (the working directory), bytecode (the chain's)
            env = {**os.environ, "RUFF_NO_CACHE": "true", "PYTHONDONTWRITEBYTECODE": "1"}
            self._proc = subprocess.Popen([sys.executable, "-m", "truss_lab.chain_gen"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                          cwd=tempfile.gettempdir(), start_new_session=True)
        return self._proc

    def _stop(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        with contextlib.suppress(OSError):
            proc.kill()
        return proc.wait()


_GENERATOR = _Generator()


def _serve() -> None:
    """The generator process: requests on stdin, answers on what was stdout (the generation's own
    prints go nowhere); stdin's end - the kernel gone - ends it."""
    answers = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    requests = sys.stdin.buffer
    _remember_formatting()
    while True:
        try:
            source, entrypoint, root, link = pickle.load(requests)
        except (EOFError, OSError):
            return
        try:
            with _linking() if link else contextlib.nullcontext():
                answer = ("ok", _generate(source, entrypoint, root))
        except TrussLabError as exc:
            answer = ("err", str(exc), getattr(exc, "location", None))
        except BaseException as exc:  # the chain's own code raised while it was imported: its file:line
            location = user_location(exc, [source.parent])
            where = f" at {location}" if location else ""
            answer = ("err", f"importing {source.name} failed{where}: {describe(exc)}", location)
        pickle.dump(answer, answers)
        answers.flush()


LINK_FROM = 1 << 20  # files this big are linked, not copied, in a scratch generation: data, weights


def _remember_formatting() -> None:
    """Truss formats each generated file with two `ruff` runs (a process each, ~15 ms): in this warm
    process the same generated source is formatted once, and its formatted bytes reused - a save that
    changed one chainlet formats that chainlet's files only. The output is ruff's, byte for byte."""
    try:
        from truss_chains.deployment import code_gen
    except ImportError:
        return
    ruff = code_gen._format_python_file
    done: dict[bytes, bytes] = {}

    def formatted(file_path: Any) -> None:
        path = Path(file_path)
        raw = path.read_bytes()
        if raw in done:
            path.write_bytes(done[raw])
            return
        ruff(file_path)
        if len(done) >= 256:  # the oldest go: generated files of code long since edited
            done.pop(next(iter(done)))
        done[raw] = path.read_bytes()

    code_gen._format_python_file = formatted


@contextlib.contextmanager
def _linking():
    """Truss's copies (shutil.copy2, in the generator process only) of big files made as hard links.
    Small ones are copied: Truss rewrites some copies in place (a TrussChainlet's config.yaml), which
    through a link would write the user's own file."""
    copy2 = shutil.copy2

    def link(src: Any, dst: Any, *, follow_symlinks: bool = True) -> Any:
        if os.path.isdir(dst):
            dst = os.path.join(dst, os.path.basename(src))
        try:
            if os.path.getsize(src) >= LINK_FROM and not os.path.islink(src):
                os.link(src, dst)
                return dst
        except OSError:
            pass
        return copy2(src, dst, follow_symlinks=follow_symlinks)

    copytree = shutil.copytree

    def tree(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) < 3:  # (symlinks, ignore, copy_function) not given by position
            kwargs.setdefault("copy_function", link)  # copytree's default is bound at its definition
        return copytree(src, dst, *args, **kwargs)

    shutil.copy2, shutil.copytree = link, tree
    try:
        yield
    finally:
        shutil.copy2, shutil.copytree = copy2, copytree


def _generate(source: Path, entrypoint: str | None, root: Path) -> _Generated:
    """Import the chain's source and write every chainlet's truss under `root` as a push does (generate
    only), in this process (the generator's). A file truss_chains refuses is one TrussLabError line naming it."""
    from truss_chains import framework, private_types
    from truss_chains.deployment import deployment_client

    from truss_chains.deployment import code_gen

    loaded: dict[str, Any] = {}
    try:
        if entrypoint is None and is_model_file(source):  # `truss push my_model.py`: one truss, as the CLI makes it
            with _generating(root), framework.ModelImporter.import_target(source) as entry:
                name = entry.display_name
                descriptors = [framework.get_descriptor(entry)]  # code_gen.gen_truss_model_from_source, in its steps
                code_gen.gen_truss_model(model_root=source.absolute().parent, model_name=name,
                                         model_descriptor=descriptors[0], use_local_src=False)
                loaded = dict(sys.modules)
        else:
            with _generating(root), framework.ChainletImporter.import_target(source, entrypoint) as entry:
                name = entry.name
                descriptors = list(deployment_client._get_ordered_dependencies([entry]))
                options = private_types.PushOptionsLocalDocker(chain_name=name, only_generate_trusses=True, use_local_src=False)
                deployment_client.push(entry, options)
                loaded = dict(sys.modules)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:  # ChainsUsageError is a TypeError
        if user_location(exc, [source.parent]) is not None:
            raise  # the chain's own line raised it: its file:line (_serve)
        raise TrussLabError(f"{source}: {' '.join(str(exc).split())}") from None
    finally:
        _keep_libraries(loaded, source.parent)
    generated = root / private_types.GENERATED_CODE_DIR
    base = generated / code_gen._name_to_dirname(name)  # where Truss's generation put each (code_gen._make_chainlet_dir)
    folders = {d.display_name: base / f"chainlet_{d.name}" for d in descriptors}
    for display, folder in folders.items():  # a push suffixes each model name with a random id: here the name is enough
        config = folder / "config.yaml"
        text = "\n".join(f"model_name: {display}" if line.startswith("model_name:") else line
                         for line in config.read_text().splitlines()) + "\n"
        fresh = config.with_name(".config.yaml.new")  # a new file in its place: never written through a link
        fresh.write_text(text)
        os.replace(fresh, config)
    order = [d.display_name for d in descriptors]
    examples = examples_file(source)
    if examples.is_file():  # the entrypoint's truss gets the chain's examples (the panel, %truss predict --example)
        shutil.copyfile(examples, folders[order[-1]] / "examples.yaml")
    return _Generated(
        name=name,
        order=order,
        depends={d.display_name: tuple(sorted(dep.display_name for dep in d.dependencies.values())) for d in descriptors},
        folders=folders,
        classes={d.display_name: (d.chainlet_cls.__module__, d.chainlet_cls.__name__) for d in descriptors},
        data_dirs={d.display_name: _data_dir(d) for d in descriptors if _data_dir(d) is not None},
        truss_dirs={d.display_name: Path(d.truss_dir).resolve() for d in descriptors if getattr(d, "truss_dir", None)},
    )


def _data_dir(descriptor: Any) -> Path | None:
    """A chainlet's remote_config data_dir (watched as the chain's own folder is)."""
    image = getattr(getattr(descriptor.chainlet_cls, "remote_config", None), "docker_image", None)
    data_dir = getattr(image, "data_dir", None)
    return Path(data_dir.abs_path).resolve() if data_dir is not None else None


def is_model_file(source: Path) -> bool:
    """A single-file model (`class Model(truss_chains.ModelBase)`, what `truss init --python-config`
    writes) rather than a chain: a ModelBase subclass and no `@chains.mark_entrypoint`."""
    import ast

    try:
        tree = ast.parse(Path(source).read_bytes())
    except (SyntaxError, ValueError, OSError):
        return False
    names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None)
             for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for n in c.bases + c.decorator_list}
    return "ModelBase" in names and "mark_entrypoint" not in names


def examples_file(source: Path) -> Path:
    """The chain's examples: `<source stem>.examples.yaml` next to it, else `examples.yaml` in its folder
    (a list of {name, input}, as a truss's examples.yaml; each input is the entrypoint's JSON body)."""
    own = source.with_name(f"{source.stem}.examples.yaml")
    return own if own.is_file() or not (source.parent / "examples.yaml").is_file() else source.parent / "examples.yaml"


def _keep_libraries(loaded: dict[str, Any], chain_root: Path) -> None:
    """truss_chains drops from sys.modules every module the chain source's import brought in, libraries
    included (it keeps torch only); numpy, TensorFlow and others cannot be imported twice in a process.
    Put back all but the chain's own files."""
    root = str(chain_root) + os.sep
    for name, module in loaded.items():
        if name in sys.modules:
            continue
        path = getattr(module, "__file__", None) or ""
        if not path.startswith(root):
            sys.modules[name] = module


_generation = threading.Lock()  # tempfile.tempdir and PATH are the process's: one generation at a time


@contextlib.contextmanager
def _generating(root: Path):
    """Truss's code generation writes under tempfile.gettempdir() and formats with `ruff`: our folder,
    and this interpreter's scripts on PATH."""
    with _generation, _swapped(root), warnings.catch_warnings():
        # truss's ignore-file matching uses a pathspec API pathspec deprecates: 320 warnings per generation
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pathspec(\.|$)")
        yield


@contextlib.contextmanager
def _swapped(root: Path):
    old_tempdir, old_path = tempfile.tempdir, os.environ.get("PATH", "")
    tempfile.tempdir = str(root)
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), old_path])
    try:
        yield
    finally:
        tempfile.tempdir = old_tempdir
        os.environ["PATH"] = old_path


if __name__ == "__main__":
    from truss_lab import chain_gen  # its classes under their own name (what the kernel unpickles), not __main__'s

    chain_gen._serve()
