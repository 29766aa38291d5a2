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
    """An ipywidgets panel for a model: input, examples, image upload, Run, Run ×N with the lock timeline,
    Profile, Check, history (needs the `notebook` extra).

    Args:
        live: a LiveModel, or a Chain (its entrypoint, with the chain's timeline).

    Returns:
        The panel: a notebook cell shows it; `panel.close()` lets go of the model.

    Raises:
        TypeError: `live` is not a model or a chain.

    Example:
        ```python
        panel = truss_lab.widget(tr)
        ```
    """
    from .notebook.widgets import widget as _widget

    return _widget(live)


def check(truss, inputs=None, **kwargs):
    """`truss-lab check` on a truss: its examples (or `inputs`) on the real Truss server (the pinned
    version, no Docker) and here, compared, plus the lints for what fails only on deploy.

    Args:
        truss: a truss folder, or a loaded LiveModel.
        inputs: the inputs to send instead of the examples.
        **kwargs: `truss_version=`, `rtol=`, `atol=` (numbers compared within them), `note=` (a
            callable told of slow set-up steps, such as installing requirements).

    Returns:
        A CheckReport: `.ok` when every answer is the same and no finding is an error.

    Example:
        ```python
        report = truss_lab.check("examples/digits")
        report.ok
        ```
    """
    from .serving.check import check as _check

    return _check(truss, inputs, make_model=load, **kwargs)


def load_chain(source, entrypoint=None, *, guard=True, secrets=None):
    """Load a Truss Chain as it deploys: each chainlet its generated truss, in a worker process of its
    own, calling the others over 127.0.0.1 (needs the `chains` extra).

    Args:
        source: the chain's source file (`my_chain.py`), or a single-file `ModelBase` model.
        entrypoint: the entrypoint chainlet's class name, when the source marks none.
        guard: `False` turns off the lock-misuse guard in every chainlet.
        secrets: secret values by name: the chainlets whose `Assets(secret_keys=[...])` name them find
            them in `context.secrets`.

    Returns:
        A Chain (`chain.run(...)`, `chain.trees()`, `chain.reload()`, ...).

    Raises:
        TrussLabError: the source fails to import (its file:line) or has no entrypoint.

    Example:
        ```python
        chain = truss_lab.load_chain("examples/digits-chain/digits_chain.py")
        chain.run(**chain.example("three"))       # {'three': 100.0}
        ```
    """
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
