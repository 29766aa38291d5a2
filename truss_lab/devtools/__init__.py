"""Tools for working on truss_lab and its examples: `make lab` (lab.py), an offline file server (localhttp.py)."""
