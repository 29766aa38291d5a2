"""Loaded by every Python process the test suite starts (notebook kernels, JupyterLab, Ray workers,
scripts): refuses network traffic that would leave this machine, so "no cell reaches outside
127.0.0.1" is checked, not hoped. Set by the root conftest.py through PYTHONPATH; nothing here runs
outside the tests.

Refused: connections to addresses that are not this machine's own, and name lookups that need DNS
(a hostname other than localhost). Allowed: loopback, this machine's interface addresses (Ray's
processes talk to each other on them) and literal IP lookups (no DNS involved).
"""

import functools
import ipaddress
import socket
import sys


@functools.lru_cache(maxsize=256)
def _own_address(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:  # only an address of this machine can be bound
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(ip), 0))
        return True
    except OSError:
        return False


def _literal_or_local(host) -> bool:
    if host in (None, "", "localhost") or isinstance(host, bytes) and host in (b"localhost",):
        return True
    try:
        ipaddress.ip_address(str(host).split("%")[0])
        return True
    except ValueError:
        return False


def _offline(event, args):
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and not _own_address(str(address[0])):
            raise ConnectionRefusedError(f"truss_lab tests run offline: connection to {address[0]}:{address[1]} refused")
    elif event == "socket.getaddrinfo":
        if not _literal_or_local(args[0]):
            raise ConnectionRefusedError(f"truss_lab tests run offline: DNS lookup of {args[0]!r} refused")


sys.addaudithook(_offline)
