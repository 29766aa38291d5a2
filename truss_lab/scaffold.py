"""`truss_lab.init` / `%truss init` / `truss-lab init`: write the scaffold `truss init` writes."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import BundleError

_CONFIG_TEMPLATE = """\
# Written by truss_lab.init, with the keys `truss init` writes.
model_name: {name}
model_module_dir: model
model_class_filename: model.py
model_class_name: Model
data_dir: data
bundled_packages_dir: packages
examples_filename: examples.yaml
python_version: py311
requirements: []
system_packages: []
environment_variables: {{}}
secrets: {{}}
external_package_dirs: []
model_metadata: {{}}
resources:
  accelerator: null
  cpu: '1'
  memory: 2Gi
  use_gpu: false
runtime:
  predict_concurrency: 1
"""

_MODEL_TEMPLATE = '''\
"""
The `Model` class is the interface between the ML model you are packaging and the model server.

* `load` runs once, before any request: load weights here and assign them to `self._model`.
* `preprocess` (optional) runs per request outside the GPU lock: downloads, decoding, resizing.
* `predict` runs per request *inside* the lock (runtime.predict_concurrency): GPU work only.
* `postprocess` (optional) runs per request outside the lock: labels, formatting, storage.
"""
from typing import Any

import numpy as np


class Model:
    def __init__(self, **kwargs):
        self._data_dir = kwargs["data_dir"]
        self._config = kwargs["config"]
        self._secrets = kwargs["secrets"]
        self._model = None

    def load(self):
        # Load the model here and assign it to self._model.
        # Until you do, a placeholder that returns its input keeps the scaffold runnable.
        self._model = _Placeholder()

    def preprocess(self, model_input: Any) -> Any:
        return model_input

    def predict(self, model_input: Any) -> Any:
        model_output = {{}}
        inputs = np.array(model_input)
        result = self._model.predict(inputs).tolist()
        model_output["predictions"] = result
        return model_output

    def postprocess(self, model_output: Any) -> Any:
        return model_output


class _Placeholder:
    """Stands in for a real model in the fresh scaffold: predict returns its input."""

    def predict(self, inputs):
        return inputs
'''

_EXAMPLES_TEMPLATE = """\
- name: example
  input: [1, 2, 3]
"""


def init(path: str | os.PathLike, name: str | None = None, python_config: bool = False) -> Path:
    """Write a new Truss scaffold at `path`, as `truss init` does: config.yaml, model/model.py with the
    stages commented, examples.yaml. It runs as it is (predict returns its input).

    Args:
        path: the folder to create (it must not exist yet).
        name: config.yaml's `model_name` (default: the folder's name).
        python_config: write what `truss init --python-config` writes instead: a folder holding
            `<name>.py`, a `class Model(truss_chains.ModelBase)` (Truss's own template, written by Truss).

    Returns:
        The folder (or, with `python_config=True`, the model file), ready for `truss_lab.load`.

    Raises:
        BundleError: `path` exists already, or the name is empty.

    Example:
        ```python
        tr = truss_lab.load(truss_lab.init("my-truss", name="My model"))
        ```
    """
    root = Path(path).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise BundleError(f"{root}: already exists; refusing to overwrite it (choose a new path)")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise BundleError(f"model name must be a non-empty string, got {name!r}")
    model_name = name or root.resolve().name
    if python_config:
        try:
            from truss.truss_handle.build import init_directory
        except ImportError:
            raise BundleError("init(python_config=True) writes Truss's own template: pip install 'truss_lab[chains]'") from None
        before = set(root.glob("*.py")) if root.is_dir() else set()
        init_directory(root, model_name=model_name, python_config=True)
        written = sorted(set(root.glob("*.py")) - before)
        return written[0].resolve() if written else root.resolve()
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    (root / "packages").mkdir(exist_ok=True)
    (root / "config.yaml").write_text(_CONFIG_TEMPLATE.format(name=yaml.safe_dump(model_name).splitlines()[0]))
    (root / "model" / "__init__.py").write_text("")
    (root / "model" / "model.py").write_text(_MODEL_TEMPLATE.format())
    (root / "examples.yaml").write_text(_EXAMPLES_TEMPLATE)
    return root.resolve()
