"""`from truss_lab.localhttp import LocalServer` keeps working: it lives in truss_lab.devtools.localhttp."""

from .devtools.localhttp import LocalServer

__all__ = ["LocalServer"]
