"""truss_lab: develop Truss models in a notebook, with Truss's semantics and no Docker.

    import truss_lab
    tr = truss_lab.load("my-truss")
    result = tr.predict(model_input)   # preprocess -> predict (under the lock) -> postprocess
    result.output, result.trace

The core (this package's top level) imports neither IPython, ipywidgets, matplotlib, tensorflow,
uvicorn nor Ray; the front ends (display/, notebook/, serving/) load when first used.
"""

from .bundle import Bundle, Example, Secrets, read_bundle
from .errors import (
    BundleError,
    LoadError,
    ModelError,
    PostprocessError,
    PredictError,
    PreprocessError,
    SecretNotFound,
    TrussLabError,
)
from .guard import Finding, LockMisuseWarning
from .live import LiveModel, load
from .reload import ReloadEvent
from .scaffold import init
from .trace import BenchReport, OutputWarning, Report, Result, Trace
from .worker import WorkerDied, WorkerModel

LiveModel.register(WorkerModel)  # a truss in a worker process has the LiveModel API (worker.py)

__version__ = "0.1.0"


def load_ipython_extension(ip):
    """`%load_ext truss_lab`: register the %truss / %%truss magics."""
    from .notebook.magics import load_ipython_extension as _load

    _load(ip)


def widget(live):
    """An ipywidgets panel for `live` (a LiveModel): input, examples, image upload, Run, Run ×N, history."""
    from .notebook.widgets import widget as _widget

    return _widget(live)


def check(truss, inputs=None, **kwargs):
    """`truss-lab check` on a truss folder or a LiveModel: its examples (or `inputs`) on the real Truss
    server and here, compared, plus the deploy lints; a CheckReport (serving/check.py)."""
    from .serving.check import check as _check

    return _check(truss, inputs, make_model=load, **kwargs)


def load_chain(source, entrypoint=None, *, guard=True, secrets=None):
    """A Truss Chain as it deploys: each chainlet its generated truss, a LiveModel, calling the others
    over 127.0.0.1 (chains.py; needs the `chains` extra). `secrets`: what the chainlets whose
    `Assets(secret_keys=[...])` name them find in `context.secrets`."""
    from .chains import load_chain as _load_chain

    return _load_chain(source, entrypoint, guard=guard, secrets=secrets)


def unload_ipython_extension(ip):
    from .notebook.magics import unload_ipython_extension as _unload

    _unload(ip)


# Drawing lives in display/ (matplotlib, PIL only when a picture is drawn); these names load it on use.
_DISPLAY = {
    "timeline": "plots",
    "Timeline": "plots",
    "compare": "compare",
    "Comparison": "compare",
}


def __getattr__(name: str):
    if name in _DISPLAY:
        import importlib

        return getattr(importlib.import_module(f".display.{_DISPLAY[name]}", __name__), name)
    raise AttributeError(f"module 'truss_lab' has no attribute {name!r}")


__all__ = [
    "BenchReport",
    "Bundle",
    "Comparison",
    "BundleError",
    "Example",
    "Finding",
    "LiveModel",
    "LoadError",
    "LockMisuseWarning",
    "ModelError",
    "OutputWarning",
    "PostprocessError",
    "PredictError",
    "PreprocessError",
    "Report",
    "ReloadEvent",
    "Result",
    "SecretNotFound",
    "Secrets",
    "Timeline",
    "Trace",
    "TrussLabError",
    "WorkerDied",
    "WorkerModel",
    "check",
    "compare",
    "init",
    "load_ipython_extension",
    "load",
    "load_chain",
    "read_bundle",
    "timeline",
    "widget",
]
