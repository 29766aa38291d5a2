"""Read and validate a Truss folder; write the scaffold `truss init` writes.

Only the keys Truss uses to *run* a model are validated; every other key is kept in `Bundle.config`
untouched, because real configs carry dozens (model_metadata, system_packages, base_image, ...).
"""

from __future__ import annotations

import functools

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import BundleError, SecretNotFound

SECRET_ENV_PREFIX = "TRUSS_SECRET_"  # the prefix Truss's SecretsResolver reads

# key -> (default, expected type(s), human description)
_STR_KEYS = {
    "model_module_dir": "model",
    "model_class_filename": "model.py",
    "model_class_name": "Model",
    "data_dir": "data",
    "bundled_packages_dir": "packages",
    "examples_filename": "examples.yaml",
}


@dataclass(frozen=True)
class Example:
    name: str
    input: Any


@dataclass
class Bundle:
    """A parsed Truss folder. `config` is the whole config.yaml as a dict (unknown keys included)."""

    path: Path
    config: dict
    model_name: str
    model_module_dir: str
    model_class_filename: str
    model_class_name: str
    data_dir_name: str
    packages_dir_name: str
    examples_filename: str
    secrets: dict[str, str | None]
    environment_variables: dict[str, str]
    predict_concurrency: int
    requirements: list[str]
    python_version: str | None
    resources: dict
    examples: list[Example] = field(default_factory=list)
    streaming_read_timeout: float = 60.0  # runtime.streaming_read_timeout: the longest gap between chunks over HTTP

    @functools.cached_property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @functools.cached_property
    def model_dir(self) -> Path:
        return self.path / self.model_module_dir

    @functools.cached_property
    def model_file(self) -> Path:
        return self.model_dir / self.model_class_filename

    @functools.cached_property  # read on every request (Result's image folders): computed once
    def data_dir(self) -> Path:
        return self.path / self.data_dir_name

    @functools.cached_property
    def packages_dir(self) -> Path:
        return self.path / self.packages_dir_name

    @functools.cached_property
    def examples_path(self) -> Path:
        return self.path / self.examples_filename

    def example(self, name: str) -> Any:
        for ex in self.examples:
            if ex.name == name:
                return ex.input
        known = ", ".join(e.name for e in self.examples) or "none"
        raise BundleError(f"{self.examples_path}: no example named {name!r} (examples: {known})")


class Secrets(Mapping):
    """Secret values by name, with the Truss server's rules: an undeclared secret, one with no value and
    one with an empty value are all missing, and a missing one raises `SecretNotFound` - from `[]`,
    from `.get()` and from `in` alike (Truss's Secrets does so) - and it cannot be iterated. Its repr
    never shows a value."""

    def __init__(self, values: dict[str, str | None], source: str):
        self._values = dict(values)
        self._source = source

    def __getitem__(self, name: str) -> str:
        if name not in self._values:
            raise SecretNotFound(
                f"secret {name!r} is not declared under 'secrets' in {self._source}"
            )
        value = self._values[name]
        if not value:
            what = "has no value" if value is None else "is empty (Truss treats an empty secret as missing)"
            raise SecretNotFound(
                f"secret {name!r} {what}: set {SECRET_ENV_PREFIX}{name} in the environment "
                f"or pass secrets={{{name!r}: ...}} to truss_lab.load"
            )
        return value

    def get(self, name: str, default: Any = None) -> str:
        """As on a Truss server: a missing secret raises here too (`default` is never returned)."""
        return self[name]

    def __contains__(self, name: object) -> bool:
        self[name]  # as on a Truss server: raises SecretNotFound for a missing secret
        return True

    def __iter__(self):
        raise NotImplementedError("Secrets are meant for lookup and can't be iterated on (as on a Truss server)")

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k!r}: {'***' if v else None}" for k, v in self._values.items())
        return f"Secrets({{{shown}}})"

    __str__ = __repr__


def resolve_secrets(bundle: Bundle, overrides: Mapping[str, str] | None = None) -> Secrets:
    """config.yaml defaults, then TRUSS_SECRET_<name> from the environment, then `overrides`."""
    values: dict[str, str | None] = dict(bundle.secrets)
    for name in values:
        env = os.environ.get(SECRET_ENV_PREFIX + name)
        if env is not None:
            values[name] = env
    undeclared = []
    for name, value in (overrides or {}).items():
        if str(name) not in values:  # Truss hands the model only the secrets config.yaml declares
            undeclared.append(str(name))
            continue
        values[str(name)] = None if value is None else str(value)
    if undeclared:
        import warnings

        warnings.warn(f"{bundle.config_path}: secrets {', '.join(map(repr, sorted(undeclared)))} passed to load() are not "
                      f"declared under `secrets`, so the model does not get them (as on Truss): declare them there",
                      UserWarning, stacklevel=3)
    return Secrets(values, str(bundle.config_path))


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read a Truss folder without loading it: config.yaml with Truss's defaults filled in, where the
    model is, its examples and secrets' names.

    Args:
        path: the truss folder.

    Returns:
        A Bundle (`.model_name`, `.config`, `.predict_concurrency`, `.examples`, `.data_dir`, ...).

    Raises:
        BundleError: the folder, a file or a config key is wrong (one line naming it).

    Example:
        ```python
        truss_lab.read_bundle("examples/digits").predict_concurrency
        ```
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise BundleError(f"{root}: no such Truss folder")
    if not root.is_dir():
        raise BundleError(f"{root}: not a folder (a Truss is a folder with config.yaml)")
    root = root.resolve()
    config_path = root / "config.yaml"
    if not config_path.is_file():
        sources = sorted(p.name for p in root.glob("*.py"))
        hint = f"; to load a single-file model or a chain, give its file: {root / sources[0]}" if sources else ""
        raise BundleError(f"{config_path}: missing (every Truss folder has a config.yaml){hint}")
    config = _load_yaml(config_path)
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise BundleError(f"{config_path}: expected a mapping of keys at the top, got {_tname(config)}")

    def key(name: str) -> str:
        return f"{config_path}: key '{name}'"

    strs = {}
    for name, default in _STR_KEYS.items():
        value = config.get(name)
        if value is None:
            value = default
        if not isinstance(value, str) or not value.strip():
            raise BundleError(f"{key(name)} must be a non-empty string, got {value!r}")
        if os.path.isabs(value) or ".." in Path(value).parts:
            raise BundleError(f"{key(name)} must be a path inside the Truss folder, got {value!r}")
        strs[name] = value
    if not re.fullmatch(r"[A-Za-z_]\w*", strs["model_class_name"]):
        raise BundleError(f"{key('model_class_name')} must be a Python class name, got {strs['model_class_name']!r}")
    if not strs["model_class_filename"].endswith(".py"):
        raise BundleError(f"{key('model_class_filename')} must name a .py file, got {strs['model_class_filename']!r}")

    model_name = config.get("model_name")
    if model_name is None:
        model_name = root.name
    if not isinstance(model_name, (str, int, float)) or isinstance(model_name, bool):
        raise BundleError(f"{key('model_name')} must be a string, got {_tname(model_name)}")
    model_name = str(model_name)

    secrets = _mapping(config, "secrets", key)
    for name, value in secrets.items():
        if value is not None and not isinstance(value, (str, int, float)):
            raise BundleError(f"{key('secrets')}: secret {name!r} must have a string default or null")
    secrets = {str(k): (None if v is None else str(v)) for k, v in secrets.items()}

    env_vars = _mapping(config, "environment_variables", key)
    for name, value in env_vars.items():
        if isinstance(value, (dict, list)):
            raise BundleError(f"{key('environment_variables')}: {name!r} must be a scalar, got {_tname(value)}")
    env_vars = {str(k): env_str(v) for k, v in env_vars.items()}

    runtime = _mapping(config, "runtime", key)
    concurrency = coerce_int(runtime.get("predict_concurrency"), 1)  # "2" is 2, as in Truss
    try:
        concurrency = validate_concurrency(concurrency)
    except ValueError as exc:
        raise BundleError(f"{key('runtime.predict_concurrency')} {exc}") from None

    read_timeout = coerce_int(runtime.get("streaming_read_timeout"), 60)
    if isinstance(read_timeout, bool) or not isinstance(read_timeout, (int, float)) or read_timeout <= 0:
        raise BundleError(f"{key('runtime.streaming_read_timeout')} must be a positive number of seconds, got {read_timeout!r}")

    requirements = config.get("requirements") or []
    if not isinstance(requirements, list) or not all(isinstance(r, str) for r in requirements):
        raise BundleError(f"{key('requirements')} must be a list of strings, got {requirements!r}")

    python_version = config.get("python_version")
    if python_version is not None and not isinstance(python_version, str):
        raise BundleError(f"{key('python_version')} must be a string like 'py311', got {python_version!r}")

    resources = _mapping(config, "resources", key)

    bundle = Bundle(
        path=root,
        config=config,
        model_name=model_name,
        model_module_dir=strs["model_module_dir"],
        model_class_filename=strs["model_class_filename"],
        model_class_name=strs["model_class_name"],
        data_dir_name=strs["data_dir"],
        packages_dir_name=strs["bundled_packages_dir"],
        examples_filename=strs["examples_filename"],
        secrets=secrets,
        environment_variables=env_vars,
        predict_concurrency=concurrency,
        requirements=list(requirements),
        python_version=python_version,
        resources=resources,
        streaming_read_timeout=float(read_timeout),
    )
    bundle.examples = read_examples(bundle.examples_path)
    return bundle


def validate_concurrency(value: Any) -> int:
    """A lock size: a positive int. Raises ValueError with the reason (callers add the key name)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def read_examples(path: Path) -> list[Example]:
    """examples.yaml: a list of {name, input}. Missing file -> no examples."""
    if not path.is_file():
        return []
    data = _load_yaml(path)
    if data is None:
        return []
    if not isinstance(data, list):
        raise BundleError(f"{path}: expected a list of {{name, input}} entries, got {_tname(data)}")
    examples = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "input" not in entry:
            raise BundleError(f"{path}: entry {i} must be a mapping with 'name' and 'input'")
        name = entry.get("name", f"example{i}")
        examples.append(Example(name=str(name), input=entry["input"]))
    return examples


def _load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        location = f"{path}:{mark.line + 1}" if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BundleError(f"{location or path}: invalid YAML: {problem}", location=location) from None


def _mapping(config: dict, name: str, key) -> dict:
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BundleError(f"{key(name)} must be a mapping, got {_tname(value)}")
    return value


def coerce_int(value: Any, default: int) -> Any:
    """An int as pydantic's lax mode reads it in Truss's TrussConfig: "2" and 2.0 are 2; else as given."""
    if value is None:
        return default
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def env_str(value: Any) -> str:
    """An environment variable value as Truss's config writes it: true/false in lower case, null as 'None'."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _tname(value: Any) -> str:
    return type(value).__name__
