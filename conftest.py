"""Settings shared by tests/ and the notebooks nbval runs (their kernels inherit this environment)."""

import os

# TensorFlow's C++ start-up lines (CPU features, oneDNN) differ per machine: keep them out of the
# notebook outputs nbval compares. Python-level warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN reorders float sums: same numbers everywhere

# Every Python process the tests start imports tests/offline/sitecustomize.py: it refuses connections
# that leave 127.0.0.1 (notebooks included), so the suite proves it needs no network.
_OFFLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "offline")
if _OFFLINE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_OFFLINE, os.environ.get("PYTHONPATH")) if p)
