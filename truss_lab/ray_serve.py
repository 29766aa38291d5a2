"""`from truss_lab import ray_serve` keeps working: the Ray Serve front end is truss_lab.serving.ray_serve."""

from .serving.ray_serve import APP_NAME, Predict, RayBackend, Stages, build, deploy, predict_stats, serve_forever, shutdown

__all__ = ["APP_NAME", "Predict", "RayBackend", "Stages", "build", "deploy", "predict_stats", "serve_forever", "shutdown"]
