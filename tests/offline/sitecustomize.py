"""Loaded by every Python process the test suite starts (notebook kernels, JupyterLab, scripts):
refuses network connections that leave 127.0.0.1, so "no cell reaches outside 127.0.0.1" is checked,
not hoped. Set by the root conftest.py through PYTHONPATH; nothing here runs outside the tests.
"""

import ipaddress
import sys


def _local(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _offline(event, args):
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and not _local(address[0]):
            raise ConnectionRefusedError(f"truss_lab tests run offline: connection to {address[0]}:{address[1]} refused")
    elif event == "socket.getaddrinfo":
        if not _local(args[0]):
            raise ConnectionRefusedError(f"truss_lab tests run offline: lookup of {args[0]!r} refused")


sys.addaudithook(_offline)
