"""A chain's hot reload: a save re-runs the code generation and reloads only the chainlets whose code
changed - their own generated files (model.py with the stubs, config.yaml, data/), or in the chain's
source and the helpers it imports, their class and everything it uses (statements.py) - each by its
truss rule, in its own worker process; chainlets added or removed by the save start or stop."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chain_gen import _Generated, generate
from .errors import TrussLabError
from .reload import Reloader, ReloadEvent
from .statements import FileKeys, Statements

if TYPE_CHECKING:
    from .chains import Chain


def _files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _same(a: Path | None, b: Path | None) -> bool:
    """Whether two files hold the same bytes: by their size and modification time where Truss's copy
    kept it (a data file copied or linked from the chain's folder is never read to be compared), else
    by their contents (the generated model.py and config.yaml, written afresh each time)."""
    if a is None or b is None:
        return a is b
    sa, sb = a.stat(), b.stat()
    if sa.st_size != sb.st_size:
        return False
    if sa.st_mtime_ns == sb.st_mtime_ns or (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev):
        return True
    return a.read_bytes() == b.read_bytes()


def _module_source(packages: Path, dotted: str) -> bytes | None:
    base = packages.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.read_bytes()
    return None


def _chainlet_keys(gen: _Generated) -> dict[str, str | None]:
    """Per chainlet, a key of its own code in the chain's source: its class and everything it uses,
    followed through (carry.Statements), with the other chainlets counted by name only - a chainlet
    depends on their API, which its generated stubs carry, not on their code."""
    chainlets = {cls for _, cls in gen.classes.values()}
    out: dict[str, str | None] = {}
    for display, (module, cls) in gen.classes.items():
        packages = gen.folders[display] / "packages"
        source = _module_source(packages, module)
        if source is None:
            out[display] = None
            continue
        keys = FileKeys(lambda dotted, p=packages: _module_source(p, dotted),
                              lambda dotted, p=packages: dotted if (p.joinpath(*dotted.split(".")) / "__init__.py").is_file()
                              else dotted.rpartition(".")[0])
        try:
            statements = _ChainletStatements(source, module, module.rpartition(".")[0], keys.key, chainlets - {cls})
            out[display] = statements.key(cls)
        except SyntaxError:
            out[display] = None
    return out


class _ChainletStatements(Statements):
    """carry.Statements with the other chainlets' classes counted by name only."""

    def __init__(self, source: bytes, module: str, package: str, file_key: Any, opaque: set[str]):
        super().__init__(source, module, package, file_key)
        self.opaque = opaque

    def key(self, name: str) -> str:
        return f"chainlet:{name}" if name in self.opaque else super().key(name)


def _named_in_code(root: Path) -> set[str]:
    """The file names (`greeting.txt`) that string literals in the chain's Python files (under `root`) mention."""
    import ast

    names: set[str] = set()
    for path in root.rglob("*.py"):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        names.update(Path(node.value).name for node in ast.walk(tree)
                     if isinstance(node, ast.Constant) and isinstance(node.value, str) and 0 < len(node.value) < 300)
    return names


def _sync(dst: Path, new: dict[str, Path], old: dict[str, Path]) -> None:
    """Make folder `dst`, which holds `old` (its `_files`), hold `new` (only the files that differ are copied)."""
    for rel, path in new.items():
        if not _same(path, old.get(rel)):
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)  # a copy of its own (the scratch one may be a link to the chain's file)
    for rel in set(old) - set(new):
        (dst / rel).unlink(missing_ok=True)


@dataclasses.dataclass
class ChainReloadEvent(ReloadEvent):
    """A chain's reload: `chainlets` maps each chainlet that was reloaded to its own ReloadEvent;
    `untouched` lists those whose code did not change (their instances and loaded state kept)."""

    chainlets: dict[str, ReloadEvent] = dataclasses.field(default_factory=dict)
    untouched: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)  # chainlets the source no longer has: stopped
    model_file: str | None = None  # a single-file model's name: its reload reads as a model's, not a chain's

    def summary(self) -> str:
        if self.model_file is not None:
            return self._model_summary(self.model_file)
        if self.kind == "failed" and not self.chainlets:
            return f"chain reload failed: {self.error} (still serving v{self.version})"
        if not self.chainlets and not self.removed:
            return f"chain v{self.version}: no chainlet's code changed; nothing reloaded"
        parts = []
        for name, event in self.chainlets.items():
            what = _users_files(event.changed)
            if event.changed == ["added"]:
                parts.append(f"{name} added" + (f" FAILED: {event.error}" if event.kind == "failed" else " (loaded, served)"))
            elif event.kind == "methods":
                parts.append(f"{name} swapped ({what}; its state kept)")
            elif event.kind == "full":
                parts.append(f"{name} rebuilt ({what})")
            elif event.kind == "failed":
                parts.append(f"{name} FAILED: {event.error} (still serving its old code)")
            else:
                parts.append(f"{name} {event.kind}")
        parts += [f"{name} removed" for name in self.removed]
        kept = f"; untouched: {', '.join(self.untouched)}" if self.untouched else ""
        return f"chain v{self.version}: {'; '.join(parts)}{kept} in {self.duration_ms:.0f} ms"

    def _model_summary(self, name: str) -> str:
        """`my_model.py` saved: what a truss's reload says (its one chainlet's event, in its file's words)."""
        if self.kind == "failed":
            return f"{name}: reload failed: {self.error} (still serving v{self.version})"
        event = next(iter(self.chainlets.values()), None)
        if event is None:
            return f"{name} v{self.version}: no code changed; nothing reloaded"
        what = _users_files(event.changed)
        done = "swapped" if event.kind == "methods" else "reloaded" if event.kind == "full" else event.kind
        kept = "; its state kept" if event.kind == "methods" else ""
        return f"{name} v{self.version}: {done} ({what}{kept}) in {self.duration_ms:.0f} ms"


def _users_files(changed: list[str]) -> str:
    """A chainlet's changed files as its author knows them: `packages/helpers.py` of its generated truss
    is the chain folder's `helpers.py`."""
    prefix = "packages" + os.sep
    return ", ".join(rel[len(prefix):] if rel.startswith(prefix) else rel for rel in changed)


class ChainReloader(Reloader):
    """Regenerates the chainlet trusses on a save and reloads only the chainlets whose code changed:
    their own generated files (model.py with the stubs, config.yaml, data/) or, in the chain's
    source and the helpers it imports, their class and everything it uses."""

    def __init__(self, chain: Chain):
        self._setup(chain)
        self.keys = _chainlet_keys(chain._gen)
        self.pending: set[str] = set()  # chainlets whose last reload failed
        self._trigger = threading.local()
        self._generation = 0

    def reload(self, full: bool = False, trigger: str = "manual") -> ReloadEvent:
        self._trigger.name = trigger  # this thread's: a save that changed nothing the chain uses is reported only when asked
        return super().reload(full, trigger)

    @property
    def watch_path(self) -> Path:
        return self.live.source.parent  # the chain root: what a push copies into every chainlet

    @property
    def watch_paths(self) -> tuple[Path, ...]:
        """The chain's folders: its root, and each chainlet's data_dir (or a TrussChainlet's truss_dir)
        that lies outside it."""
        root = self.watch_path
        gen = self.live._gen
        extra = {*gen.data_dirs.values(), *gen.truss_dirs.values()}
        return (root, *sorted({d for d in extra if d.is_dir() and not d.is_relative_to(root)}))

    def watch_filter(self, watchfiles: Any) -> Any:
        """Every file of the chain's folder its ignore rules keep (`.truss_ignore` there, else Truss's
        own list), data files included: what a push copies into the chainlets, and what `truss chains
        push --watch` watches."""
        import warnings

        import pathspec
        from truss.util import path as truss_path

        root = self.watch_path
        with warnings.catch_warnings():  # truss's pattern flavour, which pathspec deprecates: built once, not per event
            warnings.simplefilter("ignore", DeprecationWarning)
            spec = pathspec.PathSpec.from_lines(pathspec.patterns.GitWildMatchPattern,
                                                truss_path.load_trussignore_patterns_from_truss_dir(root))

        data_dirs = self.watch_paths[1:]

        def keep(change: Any, path: str) -> bool:  # truss.util.path.is_ignored, with its spec compiled once
            p = Path(path)
            if p.is_relative_to(root):
                return not spec.match_file(p.relative_to(root))
            return any(p.is_relative_to(d) for d in data_dirs)  # a data_dir or truss_dir outside the root: all of it

        return keep

    def _reload(self, full: bool) -> ChainReloadEvent | None:
        chain: Chain = self.live
        self._generation += 1
        root = chain.root / f"regenerated-{self._generation}"
        root.mkdir()
        try:
            event = self._reload_from(chain, root, full)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if event is not None and chain.model_file:
            event.model_file = chain.name
        return event

    def _reload_from(self, chain: Chain, root: Path, full: bool) -> ChainReloadEvent | None:
        try:  # a scratch generation, linked to the chain's files: only what differs reaches the live folders
            gen = generate(chain.source, chain._entrypoint_arg, root, link=True)
        except TrussLabError as exc:  # the chain's code failing to import: its file:line
            if getattr(self._trigger, "name", "") == "watch" and chain.source.is_file() and chain.source.stat().st_size == 0:
                return None  # read between an editor's truncating and writing it: its write comes next
            return ChainReloadEvent(chain.version, "failed", error=str(exc), location=getattr(exc, "location", None),
                                    exception=exc)
        was = chain._gen
        if gen.name != was.name or gen.order[-1] != was.order[-1]:
            return ChainReloadEvent(chain.version, "failed", ["entrypoint"],
                                    error=f"{chain.source.name}: the entrypoint changed ({was.order[-1]} -> {gen.order[-1]}); "
                                          f"load the chain again to rebuild it")
        added = [n for n in gen.order if n not in was.order]
        removed = [n for n in was.order if n not in gen.order]
        base = next(iter(was.folders.values())).parent  # .chains_generated/<chain>: where the live chainlet trusses are
        folders = {n: was.folders.get(n) or base / f"chainlet_{n}" for n in gen.order}
        keys = _chainlet_keys(gen)
        named = _named_in_code(next(iter(gen.folders.values())) / "packages")  # the chain's files a push copies
        todo, rebuild, python_changed = [], set(), False
        for name in gen.order:
            if name in added:  # its generated truss, where the chain's live chainlet trusses are
                shutil.copytree(gen.folders[name], folders[name])
                continue
            new, old = _files(gen.folders[name]), _files(folders[name])
            # its own generated files (stubs, config, data/), and a file of the chain's folder its code
            # names (a template read through make_abs_path_here("greeting.txt")); its .py files are judged
            # by the statements each chainlet uses (keys); a file no code names (a notebook, an exported
            # trace) is copied into its packages/ as a push would, and reloads nothing
            differ = [rel for rel in sorted(set(new) | set(old)) if not _same(new.get(rel), old.get(rel))]
            packages = [rel for rel in differ if rel.startswith("packages" + os.sep)]
            named_files = [rel for rel in packages if not rel.endswith(".py") and Path(rel).name in named]
            own = [rel for rel in differ if rel not in packages] + named_files
            python_changed = python_changed or any(rel.endswith(".py") for rel in packages)
            if named_files:  # read at import or in __init__, by whichever of its code: built again
                rebuild.add(name)
            if full or own or keys[name] is None or keys[name] != self.keys.get(name) or name in self.pending:
                todo.append(name)  # its own generated files (stubs, config, data) or its code changed, or it failed last time
            _sync(folders[name], new, old)  # its truss as a push would write it now (a later full reload reads it)
        if not (todo or added or removed):  # no chainlet's code or files changed: a comment (said), a notebook beside it (not)
            quiet = getattr(self._trigger, "name", "") == "watch" and not python_changed
            return None if quiet else ChainReloadEvent(chain.version, "unchanged", untouched=list(gen.order))
        events: dict[str, ReloadEvent] = {}
        not_added: list[str] = []
        for name in gen.order:  # dependencies first: a new chainlet is served before the ones calling it reload
            if name in added:
                try:
                    live = chain._start_chainlet(name, folders[name], bool(gen.depends[name]), False)
                    events[name] = ReloadEvent(live.version, "full", ["added"])
                    self.keys[name] = keys[name]
                except Exception as exc:  # its load() raised: the next save tries again
                    chain.chainlets.pop(name, None)
                    shutil.rmtree(folders.pop(name), ignore_errors=True)
                    not_added.append(name)
                    events[name] = ReloadEvent(chain.version, "failed", ["added"], error=str(exc),
                                               location=getattr(exc, "location", None), exception=exc)
            elif name in todo:
                events[name] = chain.chainlets[name].reload(full=full or name in rebuild)
                if events[name].ok:
                    self.keys[name] = keys[name]
                    self.pending.discard(name)
                else:  # its folder already holds the new files: the next save must try it again
                    self.pending.add(name)
        failed = {n: e for n, e in events.items() if not e.ok}
        # a chainlet the source no longer has goes once nothing calls it: if a reload failed, old code may
        kept = removed if failed else []  # still call it, so it stays until a save that reloads cleanly
        for name in removed:
            if name not in kept:
                chain._stop_chainlet(name, was.folders[name])
                self.keys.pop(name, None)
        order = kept + [n for n in gen.order if n not in not_added]
        chain._gen = _Generated(
            name=gen.name, order=order,
            depends={**{n: was.depends[n] for n in kept}, **{n: gen.depends[n] for n in order if n not in kept}},
            folders={**{n: was.folders[n] for n in kept}, **{n: folders[n] for n in order if n not in kept}},
            classes={**{n: was.classes[n] for n in kept}, **{n: gen.classes[n] for n in order if n not in kept}},
            data_dirs=gen.data_dirs, truss_dirs=gen.truss_dirs,
        )
        chain.chainlets = {n: chain.chainlets[n] for n in order}
        gone = [n for n in removed if n not in kept]
        if gone or any(e.kind in ("methods", "full") for e in events.values()):
            chain.version += 1
        untouched = [n for n in order if n not in events or events[n].kind == "unchanged"]
        if failed:
            name, event = next(iter(failed.items()))
            return ChainReloadEvent(chain.version, "failed", list(events), error=f"{name}: {event.error}",
                                    location=event.location, exception=event.exception, chainlets=events,
                                    untouched=untouched, removed=gone)
        kind = "full" if gone or any(e.kind == "full" for e in events.values()) else "methods" if events else "unchanged"
        return ChainReloadEvent(chain.version, kind, [n for n in events if n not in untouched],
                                chainlets={n: e for n, e in events.items() if n not in untouched}, untouched=untouched,
                                removed=gone)
