"""The framework's own profiler around profiled requests (`tr.profile(x, ops=True)`): the ops predict ran,
heaviest first - TensorFlow's (its XPlane trace, for TensorBoard) or PyTorch's (`torch.profiler`, CPU and
CUDA). Each predict call is marked in the framework's own trace (profile.MARKER), so its clock decides."""

from __future__ import annotations

from dataclasses import dataclass

from .profile import MARKER


@dataclass(frozen=True)
class OpStat:
    """One framework op (a kernel, on a GPU) over the profiled predicts."""

    op: str
    seconds: float
    count: int

    def __str__(self) -> str:
        return f"{self.seconds * 1000:9.3f} ms  x{self.count:<5} {self.op}"


@dataclass
class Ops:
    """The heaviest ops predict ran, from the framework's own profiler, and where its trace is."""

    framework: str
    logdir: str  # `tensorboard --logdir LOGDIR` (the Profile tab) opens the framework's own trace
    ops: list[OpStat]

    def text(self, n: int = 10) -> str:
        viewer = "TensorBoard" if self.framework == "TensorFlow" else "chrome://tracing or Perfetto"
        lines = [f"{self.framework} ops in predict (its own trace, for {viewer}: {self.logdir})"]
        lines += [f"  {o}" for o in self.ops[:n]]
        return "\n".join(lines)


class _FrameworkOps:
    """A framework's own profiler around the profiled requests (a context manager), its trace in `logdir`."""

    prefix = "truss-lab-profile-"

    def __init__(self, logdir: str | None = None):
        import tempfile

        self.logdir = logdir or tempfile.mkdtemp(prefix=self.prefix)


class TensorFlowOps(_FrameworkOps):
    """TensorFlow's profiler around the profiled requests; the ops that ran inside predict, whose
    windows are marked in TensorFlow's own trace (a TraceMe per predict call), so its clock is used."""

    prefix = "truss-lab-tf-profile-"

    @staticmethod
    def marker(name: str):
        import tensorflow as tf

        return tf.profiler.experimental.Trace(name)

    def __enter__(self):
        import tensorflow as tf

        tf.profiler.experimental.start(self.logdir)
        return self

    def __exit__(self, *exc):
        import tensorflow as tf

        tf.profiler.experimental.stop()

    def ops(self) -> Ops:
        import collections
        import glob

        from tensorflow.tsl.profiler.protobuf import xplane_pb2

        totals: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        for path in glob.glob(f"{self.logdir}/**/*.xplane.pb", recursive=True):
            space = xplane_pb2.XSpace()
            with open(path, "rb") as f:
                space.ParseFromString(f.read())
            events = []  # (start ps, end ps, name, on a device)
            for plane in space.planes:
                device = plane.name.startswith("/device:")
                for line in plane.lines:
                    base = line.timestamp_ns * 1000
                    for event in line.events:
                        name = plane.event_metadata[event.metadata_id].name
                        events.append((base + event.offset_ps, base + event.offset_ps + event.duration_ps, name, device))
            windows = [(a, b) for a, b, name, _ in events if name == MARKER]
            for a, b, name, device in events:
                op = _op_name(name, device)
                if op is None or not any(wa <= a <= wb for wa, wb in windows):
                    continue
                totals[op] += (b - a) / 1e12
                counts[op] += 1
        ops = [OpStat(op, seconds, counts[op]) for op, seconds in totals.most_common()]
        return Ops("TensorFlow", self.logdir, ops)


class TorchOps(_FrameworkOps):
    """PyTorch's profiler (CPU, and CUDA kernels when a GPU is there) around the profiled requests; the
    ops inside predict's windows (a `record_function` per predict call), self time, heaviest first."""

    prefix = "truss-lab-torch-profile-"
    _prof = None

    @staticmethod
    def marker(name: str):
        import torch

        return torch.profiler.record_function(name)

    def __enter__(self):
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        from pathlib import Path

        Path(self.logdir).mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(Path(self.logdir) / "torch-trace.json"))  # chrome://tracing, Perfetto

    def ops(self) -> Ops:
        import collections

        events = list(self._prof.events())
        windows = [(e.time_range.start, e.time_range.end) for e in events if e.name == MARKER]
        totals: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        for e in events:
            if e.name == MARKER or not any(a <= e.time_range.start <= b for a, b in windows):
                continue
            device_us = e.self_device_time_total if hasattr(e, "self_device_time_total") else getattr(e, "self_cuda_time_total", 0)
            totals[e.name] += (e.self_cpu_time_total + device_us) / 1e6
            counts[e.name] += 1
        ops = [OpStat(op, seconds, counts[op]) for op, seconds in totals.most_common() if seconds > 0]
        return Ops("PyTorch", self.logdir, ops)


def framework_ops(logdir: str | None = None):
    """The op profiler for the framework the model imported: PyTorch's, else TensorFlow's; None if neither."""
    import sys

    if "torch" in sys.modules:
        return TorchOps(logdir)
    if "tensorflow" in sys.modules:
        return TensorFlowOps(logdir)
    return None


def _op_name(event_name: str, device: bool) -> str | None:
    """The op an XPlane event is: a kernel on a device plane; `EagerLocalExecute: Conv2D` or a
    `name:Type` op on the host (the rest is the runtime's own bookkeeping)."""
    if device:
        return event_name
    if event_name.startswith("EagerLocalExecute: "):
        return event_name.split(": ", 1)[1]
    if ":" in event_name and "::" not in event_name and " " not in event_name:
        return event_name.rsplit(":", 1)[1]
    return None
