"""Exception types: one per place a Truss can go wrong, each with a one-line message.

`BundleError` is about the folder (a file or a key); the `ModelError` family is about the model's own
code and names the stage and the user's file:line, with the original exception chained as __cause__.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any


class TrussLabError(Exception):
    """Base class of every error truss_lab raises on purpose."""


class BundleError(TrussLabError):
    """The Truss folder or one of its files/keys is invalid (names the file and key)."""

    def __init__(self, message: str, *, location: str | None = None):
        super().__init__(message)
        self.location = location  # 'file:line' where the file's parser knows the line


class SecretNotFound(TrussLabError, KeyError):
    """A secret the model asked for has no value. Never carries the value of any secret."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelError(TrussLabError):
    """The model's own code raised; `stage` says where, `location` is 'file:line' in the user's code."""

    stage = "model"
    remote_traceback: str | None = None  # raised in a worker process: its traceback of the model's frames

    def __init__(self, message: str, *, location: str | None = None, trace=None, roots: list[Path] | None = None):
        super().__init__(message)
        self.location = location
        self.trace = trace
        self.roots = roots or []

    @classmethod
    def from_exception(cls, exc: BaseException, roots: list[Path], *, trace=None, what: str | None = None) -> "ModelError":
        location = user_location(exc, roots)
        where = f" at {location}" if location else ""
        err = cls(f"{what or cls.stage} failed{where}: {describe(exc)}", location=location, trace=trace, roots=roots)
        err.__cause__ = exc.with_traceback(_from_model_frames(exc.__traceback__))
        return err

    def model_traceback(self) -> str | None:
        """The original exception's traceback, filtered to the user's own files (None if there is none)."""
        cause = self.__cause__
        if cause is None or cause.__traceback__ is None or not self.roots:
            return self.remote_traceback
        return user_traceback(cause, self.roots)


_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


def _from_model_frames(tb: Any) -> Any:
    """A traceback from the first frame that is not truss_lab's (the runner that called the stage):
    what a user reads, and what `%debug` walks, starts at their own code."""
    first = tb
    while first is not None and first.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        first = first.tb_next
    return first or tb


class LoadError(ModelError):
    """Importing model.py, building the Model class, running load(), or a definition error."""

    stage = "load"


class InputError(ModelError):
    """The request's input does not fit what the model's signature asks for (a pydantic model)."""

    stage = "input"


class PreprocessError(ModelError):
    stage = "preprocess"


class PredictError(ModelError):
    stage = "predict"


class PostprocessError(ModelError):
    stage = "postprocess"


STAGE_ERRORS: dict[str, type[ModelError]] = {
    cls.stage: cls for cls in (LoadError, InputError, PreprocessError, PredictError, PostprocessError)
}


DESCRIBE_MAX_LINES = 4  # informative lines kept from a multi-line message
DESCRIBE_MAX_CHARS = 400


def describe(exc: BaseException) -> str:
    """'TypeName: message' on one line.

    A multi-line message keeps its informative lines, joined with ' | ' (bounded): TensorFlow's
    `Graph execution error:` is nothing without the `Matrix size-incompatible: In[0]: [1,64], ...` line
    further down. Stack-frame lines (`File "...", line N`, the source under them, `[[{{node ...}}]]`)
    are left out: the location is given separately.
    """
    name = type(exc).__name__
    if isinstance(exc, SyntaxError) and exc.msg:  # its str() repeats the file and line we name already
        return f"{name}: {exc.msg}"
    lines = _informative_lines(str(exc))
    if not lines:
        return name
    text = " | ".join(lines)
    if len(text) > DESCRIBE_MAX_CHARS:
        text = text[: DESCRIBE_MAX_CHARS - 1].rstrip() + "…"
    return f"{name}: {text}"


def _informative_lines(message: str) -> list[str]:
    kept: list[str] = []
    in_frames = False
    for raw in message.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith(("File \"", "Traceback (most recent call last)")) or "(most recent call last)" in line:
            in_frames = True  # frames follow; their source lines are indented under them
            continue
        if in_frames and raw[:1] in (" ", "\t"):
            continue
        in_frames = False
        if line.startswith("[[{{node") or line.startswith("[["):
            continue
        kept.append(line)
        if len(kept) == DESCRIBE_MAX_LINES:
            break
    return kept


def user_location(exc: BaseException, roots: list[Path]) -> str | None:
    """The deepest traceback frame inside one of `roots` (the truss folder), as 'rel/path.py:LINE'.

    A SyntaxError names its own file and line, not a frame, so it is asked first.
    """
    roots = [Path(r).resolve() for r in roots]
    found = _deepest(exc, roots)
    if len(roots) > 1 and (found is None or found[1] > 0):  # a chainlet: its generated code re-raised
        inner = exc.__cause__ or exc.__context__  # what the chain's own code raised (roots[0]), if anything
        while inner is not None:
            mine = _deepest(inner, roots)
            if mine is not None and mine[1] == 0:
                return mine[0]
            inner = inner.__cause__ or inner.__context__
    return found[0] if found else None


def _deepest(exc: BaseException, roots: list[Path]) -> tuple[str, int] | None:
    """('rel/path.py:LINE', index of its root) of the deepest frame of `exc` in one of `roots`."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        rel = _relative(Path(exc.filename), roots)
        if rel:
            return f"{rel}:{exc.lineno}", _root_index(Path(exc.filename), roots)
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        rel = _relative(Path(frame.filename), roots)
        if rel:
            found = f"{rel}:{frame.lineno}", _root_index(Path(frame.filename), roots)
    return found


def _root_index(path: Path, roots: list[Path]) -> int:
    resolved = path.resolve()
    return next((i for i, root in enumerate(roots) if resolved.is_relative_to(root)), len(roots))


def user_traceback(exc: BaseException, roots: list[Path]) -> str:
    """The traceback of `exc` filtered to frames in the user's files (what the magics show on demand)."""
    roots = [Path(r).resolve() for r in roots]
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _relative(Path(f.filename), roots)]
    lines = ["Traceback (model code only):\n", *traceback.format_list(frames)]
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)


SHOWN_AS: dict[Path, str] = {}  # a root shown under another name: a chainlet's packages/ as the chain's folder


def _relative(path: Path, roots: list[Path]) -> str | None:
    try:
        resolved = path.resolve()
    except OSError:
        return None
    for root in roots:
        if resolved.is_relative_to(root):
            return os.path.join(SHOWN_AS.get(root, root.name), str(resolved.relative_to(root)))
    return None
