"""truss_lab: develop Truss models in a notebook, with Truss's semantics and no Docker.

    import truss_lab
    tr = truss_lab.load("my-truss")
    result = tr.predict(model_input)   # preprocess -> predict (under the lock) -> postprocess
    result.output, result.trace

The core (this package's top level) imports neither IPython, ipywidgets, matplotlib nor tensorflow.
"""

from .bundle import Bundle, Example, Secrets, init, read_bundle
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
from .compare import Comparison, compare
from .guard import Finding, LockMisuseWarning
from .plots import Timeline, timeline
from .reload import ReloadEvent
from .runner import LiveModel, OutputWarning, Result, load
from .trace import BenchReport, Report, Trace

__version__ = "0.1.0"


def load_ipython_extension(ip):
    """`%load_ext truss_lab`: register the %truss / %%truss magics."""
    from .magics import load_ipython_extension as _load

    _load(ip)


def widget(live):
    """An ipywidgets panel for `live` (a LiveModel): input, examples, image upload, Run, Run ×N, history."""
    from .widgets import widget as _widget

    return _widget(live)


def unload_ipython_extension(ip):
    from .magics import unload_ipython_extension as _unload

    _unload(ip)


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
    "compare",
    "init",
    "load_ipython_extension",
    "load",
    "read_bundle",
    "timeline",
    "widget",
]
