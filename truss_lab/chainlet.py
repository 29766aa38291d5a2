"""What a chainlet's worker process adds to its LiveModel (chains.py starts one per chainlet).

Deployed, each chainlet is a process of its own that finds the chainlets it calls through the
`dynamic_chainlet_config` the platform mounts; here the mount is a folder of the chain's
(`TRUSS_LAB_DYNAMIC_CONFIG_DIR`), as for the real Truss server in `truss-lab check`. Its requests
record their span (a call's parent is its caller's), and the HTTP clients its stubs opened are closed
when a full reload replaces its instance or it closes, as a chainlet's process exit would.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any


def mount(packages: str | None = None) -> None:
    """Before the chainlet loads: the platform's /etc/b10_dynamic_config mount is the chain's folder;
    a file:line in its `packages/` (the chain's folder, copied) names the chain's own file."""
    from pathlib import Path

    from . import snapshot
    from .errors import SHOWN_AS

    snapshot.PACKAGES_ASSETS = False  # which of the chain folder's files reload it is the chain's to say
    source = os.environ.get("TRUSS_LAB_CHAIN_FOLDER")
    if packages and source:
        SHOWN_AS[Path(packages).resolve()] = Path(source).name
    truss_dir = os.environ.get("TRUSS_LAB_TRUSS_DIR")  # a TrussChainlet: its folder is a copy of the user's truss
    if packages and truss_dir:
        SHOWN_AS[Path(packages).resolve().parent] = Path(truss_dir).name
    folder = os.environ.get("TRUSS_LAB_DYNAMIC_CONFIG_DIR")
    if folder:
        for name in ("_truss_shared.dynamic_config_resolver", "truss.templates.shared.dynamic_config_resolver"):
            with contextlib.suppress(ImportError):
                importlib.import_module(name).DYNAMIC_CONFIG_MOUNT_DIR = folder


def adopt(live: Any) -> None:
    """Once it loaded: spans on its requests, its stubs' clients closed with it, and before each import
    of a reload the chain forgotten (`_forget_the_chain`)."""
    live.chainlet = True
    live.resident.before_import.append(_forget_the_chain)
    live.on_retire(lambda instance: close_stubs(instance, live))
    live.on_close(lambda: close_stubs(live.model, live))


def _forget_the_chain() -> None:
    """Before the chain's source is imported again: truss_chains' registry of chainlet classes emptied
    (each would register again under its name) and the mount read again (a chainlet may be new)."""
    with contextlib.suppress(ImportError, AttributeError):
        from truss_chains import framework
        from truss_chains.remote_chainlet import utils

        framework._global_chainlet_registry.clear()
        utils.load_dynamic_chainlet_config.cache_clear()


def close_stubs(instance: Any, live: Any) -> None:
    """Close the HTTP clients the stubs of one chainlet instance opened (aiohttp sessions on the
    model's event loop): else each is an "Unclosed client session" error at exit."""
    try:
        from truss_chains.remote_chainlet.stub import StubBase
    except ImportError:
        return
    chainlet = getattr(instance, "_chainlet", None)
    for value in list(getattr(chainlet, "__dict__", {}).values()):
        if not isinstance(value, StubBase):
            continue
        sync_client, async_client = getattr(value, "_cached_sync_client", None), getattr(value, "_cached_async_client", None)
        with contextlib.suppress(Exception):
            if sync_client is not None:
                sync_client[0].close()
            if async_client is not None and not async_client[0].closed:
                live._loop.run(async_client[0].close())
