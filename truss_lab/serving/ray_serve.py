"""Scale a truss out on Ray Serve: the lock becomes a deployment's `max_ongoing_requests`.

    from truss_lab import ray_serve   # (truss_lab.serving.ray_serve)
    url = ray_serve.deploy("my-truss", num_replicas=2, stage_replicas=4, num_gpus=1)
    # POST {url}/v1/models/model:predict - the same routes and errors as `truss-lab serve`
    ray_serve.shutdown()

    truss-lab serve my-truss --ray --replicas 2 --stage-replicas 4 --gpus 1

Two deployments, the Truss split made physical:
- `predict`: runs predict only; `max_ongoing_requests` = `runtime.predict_concurrency`, so each
  replica admits as many requests as the lock has slots (the lock, per replica); `num_gpus` per
  replica. `num_replicas` of them.
- `stages`: the HTTP ingress (every route of routes.py, as `truss-lab serve`) running preprocess and postprocess, which need
  no GPU, so it can have more replicas (`stage_replicas`) than there are GPUs.

Each replica loads the truss itself (import model.py, `load()`): preprocess/postprocess may use what
`load()` prepared (label files, tokenizers), so the stage replicas run `load()` too, without a GPU.
Ray is an optional extra: `pip install 'truss_lab[ray]'`.
"""
# No `from __future__ import annotations` here: FastAPI must see the real `Request` class on the
# ingress methods, and Ray rebuilds the class in each replica.


import os
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from starlette.concurrency import run_in_threadpool

from ..bundle import read_bundle
from ..errors import STAGE_ERRORS
from .http import DEFAULT_MAX_BODY, PREDICT_ROUTE, Answer, LiveBackend
from .routes import add_routes

APP_NAME = "truss_lab"


def _load(path: str):
    from ..live import load

    return load(path)


@serve.deployment(name="predict")
class Predict:
    """predict() only, on this replica's copy of the model; counts how many calls overlap."""

    def __init__(self, path: str):
        self.live = _load(path)
        self._mutex = threading.Lock()
        self._in_flight = 0
        self._max_in_flight = 0
        self._calls = 0
        self._replica = serve.get_replica_context().replica_id.unique_id

    def predict(self, x: Any) -> dict:
        with self._mutex:
            self._in_flight += 1
            self._calls += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            y, error = self.live.run_stage("predict", x)
        finally:
            with self._mutex:
                self._in_flight -= 1
        if error is not None:  # plain data across processes: the ingress rebuilds the error
            return {"error": str(error), "location": error.location}
        return {"output": y}

    def stats(self) -> dict:
        """What this replica saw: the most predicts at once (never above the lock), and how many."""
        with self._mutex:
            return {
                "replica": self._replica,
                "max_in_flight": self._max_in_flight,
                "calls": self._calls,
                "lock": self.live.concurrency,
                "lock_free": self.live.lock_available,
            }


class RayBackend:
    """serve.Backend for the ingress: pre/postprocess here, predict on the `predict` deployment."""

    def __init__(self, live, predictor):
        self.live = live
        self.name = live.name
        self.predictor = predictor

    def ready(self) -> bool:
        return True

    def methods(self):
        return self.live.serving.methods

    async def answer(self, model_input: Any, request: Any = None, method: str = "predict") -> Answer:
        # A stream cannot cross the deployment boundary chunk by chunk here: predict joins it. The
        # request object cannot cross it either: a split deployment's methods get one made from the input.
        if method != "predict":
            return await LiveBackend(self.live).answer(model_input, None, method)  # no lock: runs here
        x, error = await run_in_threadpool(self.live.run_stage, "preprocess", model_input)
        if error is not None:
            return Answer(error=error)
        reply = await self.predictor.predict.remote(x)
        if "error" in reply:
            return Answer(error=STAGE_ERRORS["predict"](reply["error"], location=reply["location"]))
        output, error = await run_in_threadpool(self.live.run_stage, "postprocess", reply["output"])
        return Answer(output=output, error=error)

    def schema(self) -> dict | None:
        return self.live.schema()

    def reload(self):
        """POST /hot-reload: this ingress replica's code (each replica watches nothing: it reloads when asked)."""
        return self.live.reload()


class _ReplicaBackend:
    """The routes' backend in an ingress replica: the RayBackend its Stages made (one per replica process)."""

    current: RayBackend | None = None
    max_body: int | None = None

    def __getattr__(self, name: str):
        if _ReplicaBackend.current is None:
            raise AttributeError(name)
        return getattr(_ReplicaBackend.current, name)

    def ready(self) -> bool:
        return _ReplicaBackend.current is not None

    @property
    def name(self) -> str:
        return _ReplicaBackend.current.name if _ReplicaBackend.current is not None else "model"


ingress = FastAPI(title="truss_lab on Ray Serve", docs_url=None, redoc_url=None)
add_routes(ingress, _ReplicaBackend(), DEFAULT_MAX_BODY)  # the same table as `truss-lab serve`


@serve.deployment(name="stages")
@serve.ingress(ingress)
class Stages:
    """The HTTP routes (routes.py's table); preprocess and postprocess run here (no GPU)."""

    def __init__(self, predictor, path: str, max_body: int):
        _ReplicaBackend.current = RayBackend(_load(path), predictor)
        _ReplicaBackend.max_body = max_body


def build(
    path: str | os.PathLike,
    *,
    num_replicas: int = 1,
    stage_replicas: int = 1,
    num_gpus: float = 0,
    num_cpus: float = 1,
    accelerator_type: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
):
    """The Ray Serve application for the truss at `path` (not yet running: see `deploy`)."""
    bundle = read_bundle(path)  # a bad folder fails here, not in a replica
    where = str(Path(bundle.path).resolve())
    predict_options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if accelerator_type:
        predict_options["accelerator_type"] = accelerator_type
    predictor = Predict.options(
        num_replicas=num_replicas,
        max_ongoing_requests=bundle.predict_concurrency,  # the lock, per replica
        ray_actor_options=predict_options,
    ).bind(where)
    return Stages.options(
        num_replicas=stage_replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": 0},
    ).bind(predictor, where, max_body)


def deploy(
    path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_replicas: int = 1,
    stage_replicas: int = 1,
    num_gpus: float = 0,
    num_cpus: float = 1,
    accelerator_type: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    ray_init: dict | None = None,
) -> str:
    """Deploy the truss on Ray Serve (starting Ray on this machine if it is not running); returns the URL.

    `ray_init` is passed to `ray.init` when Ray is not initialised yet (e.g. {"num_cpus": 4} or
    {"address": "auto"} to join a cluster).
    """
    import ray

    if not ray.is_initialized():
        ray.init(**{"include_dashboard": False, "log_to_driver": False, **(ray_init or {})})
    serve.start(http_options={"host": host, "port": port})
    app = build(path, num_replicas=num_replicas, stage_replicas=stage_replicas, num_gpus=num_gpus,
                num_cpus=num_cpus, accelerator_type=accelerator_type, max_body=max_body)
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def predict_stats() -> list[dict]:
    """`Predict.stats()` from every predict replica (asks until each replica has answered once)."""
    handle = serve.get_deployment_handle("predict", app_name=APP_NAME)
    status = serve.status().applications[APP_NAME].deployments["predict"]
    expected = max(1, status.replica_states.get("RUNNING", 0))
    seen: dict[str, dict] = {}
    for _ in range(50 * expected):  # requests are routed to replicas at random: ask until all answered
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats
        if len(seen) >= expected:
            break
    return list(seen.values())


def shutdown() -> None:
    """Remove the application, stop Serve and Ray (what `deploy` started)."""
    import ray

    serve.shutdown()
    if ray.is_initialized():
        ray.shutdown()


def serve_forever(path: str, *, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """`truss-lab serve PATH --ray`: deploy, print the URL, wait for Ctrl-C, shut down."""
    try:
        url = deploy(path, host=host, port=port, **options)
        print(f"serving {path} on Ray Serve at {url}{PREDICT_ROUTE} (Ctrl-C stops)", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()  # also after a Ctrl-C during deploy: no Ray processes left behind
