"""Serving front ends: HTTP with the Truss server's routes (http.py) and Ray Serve (ray_serve.py)."""
