import os
import signal
import threading
import time
import warnings

import pytest

import truss_lab
from truss_lab import OutputWarning, PostprocessError, PredictError, PreprocessError
from truss_lab.trace import max_concurrent
from conftest import CONTEXTVAR_STREAM_MODEL, write_truss


def test_three_stages_in_order_with_trace(live):
    tr = live()
    r = tr.predict(1)
    assert r.ok and r.output == {"post": {"pred": {"pre": 1}}}
    t = r.trace
    assert t.start <= t.pre_start <= t.pre_end <= t.lock_requested <= t.lock_acquired
    assert t.lock_acquired <= t.predict_start <= t.predict_end <= t.lock_released
    assert t.lock_released <= t.post_start <= t.post_end <= t.end
    assert t.version == 1 and t.thread == threading.current_thread().name
    assert t.total_ms >= t.pre_ms + t.predict_ms + t.post_ms
    assert tr.traces[-1] is t


def test_optional_stages(live):
    tr = live("class Model:\n    def predict(self, x):\n        return x + 1\n")
    r = tr.predict(1)
    assert r.output == 2 and r.trace.pre_start is None and r.trace.post_start is None


def test_async_methods(live):
    tr = live(
        """
        import asyncio
        class Model:
            async def preprocess(self, x):
                await asyncio.sleep(0)
                return x + 1
            async def predict(self, x):
                await asyncio.sleep(0)
                return x * 10
            async def postprocess(self, x):
                return {"y": x}
        """
    )
    assert tr.predict(1).output == {"y": 20}
    # and from inside a running event loop (as in a notebook cell)
    import asyncio

    async def inside():
        return tr.predict(2).output

    assert asyncio.run(inside()) == {"y": 30}


def test_an_async_stream_runs_its_steps_in_one_context(live):
    """As on the Truss server (one task iterates it): a ContextVar a `with` sets before the first
    chunk is still set at the last, and resetting it there works (the request does not fail)."""
    tr = live(CONTEXTVAR_STREAM_MODEL)
    result = tr.run(7)
    assert result.ok, result.trace.error
    assert result.output == "r7-0 r7-1 r7-2 "


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_streaming_predict_holds_lock_until_consumed(live, kind):
    code = {
        "sync": """
            class Model:
                def preprocess(self, x):
                    return x
                def predict(self, n):
                    for i in range(n):
                        yield f"t{i} "
        """,
        "async": """
            import asyncio
            class Model:
                async def predict(self, n):
                    for i in range(n):
                        await asyncio.sleep(0)
                        yield f"t{i} "
        """,
    }[kind]
    tr = live(code)
    r = tr.predict(3)
    assert r.output == "t0 t1 t2 " and r.trace.chunks == 3
    assert r.trace.predict_start <= r.trace.first_chunk <= r.trace.predict_end
    assert tr.lock_available == 1

    stream = tr.stream(4)
    assert next(stream) == "t0 "
    assert tr.lock_available == 0  # held while the stream is open
    assert next(stream) == "t1 "
    stream.close()  # stopped early
    assert tr.lock_available == 1
    assert list(tr.stream(2)) == ["t0 ", "t1 "]
    assert tr.lock_available == 1
    assert tr.traces[-1].chunks == 2


@pytest.mark.parametrize(
    "stage, error_type",
    [("preprocess", PreprocessError), ("predict", PredictError), ("postprocess", PostprocessError)],
)
def test_stage_errors_name_stage_and_line_and_release_lock(live, stage, error_type):
    code = f"""
        class Model:
            def preprocess(self, x):
                return x
            def predict(self, x):
                return x
            def postprocess(self, x):
                return x
            def {stage}(self, x):
                return {{"a": 1}}["missing"]
    """
    tr = live(code)
    with pytest.raises(error_type) as info:
        tr.predict(1)
    err = info.value
    assert str(err).startswith(f"{stage} failed at t/model/model.py:10: KeyError")
    assert isinstance(err.__cause__, KeyError)
    import traceback

    # what the user reads starts at their own code: the cause's frames are the model's stage, and the
    # error itself is raised from the call, not from the runner's insides
    assert [f.name for f in traceback.extract_tb(err.__cause__.__traceback__)] == [stage]
    assert [f.name for f in traceback.extract_tb(err.__traceback__)][-2:] == ["predict", "raise_for_error"]
    assert err.trace.error_stage == stage and err.trace.location == "t/model/model.py:10"
    assert tr.lock_available == 1
    # non-raising form keeps the error on the Result
    r = tr.run(1)
    assert not r.ok and isinstance(r.error, error_type) and r.output is None
    assert tr.report().failures == {stage: 2}


def test_keyboard_interrupt_in_predict_releases_lock(live):
    tr = live(
        """
        class Model:
            def predict(self, x):
                raise KeyboardInterrupt
        """
    )
    with pytest.raises(KeyboardInterrupt):
        tr.predict(1)
    assert tr.lock_available == 1
    assert tr.traces[-1].error_stage == "predict"


def test_real_interrupt_while_waiting_in_async_predict(live, sigint_raises):
    """A notebook's interrupt (the kernel sends SIGINT -> KeyboardInterrupt in the main thread)."""
    tr = live(
        """
        import asyncio
        class Model:
            async def predict(self, x):
                await asyncio.sleep(30)
        """
    )
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        tr.predict(1)
    assert time.monotonic() - t0 < 10
    assert tr.lock_available == 1


def test_lock_bounds_predict_but_not_other_stages(live):
    """20 threads: predict never has more than lock-size holders; pre/post overlap freely."""
    code = """
        import threading, time
        class Model:
            def __init__(self, **kw):
                self.active = 0
                self.peak = 0
                self.pre_peak = 0
                self.pre_active = 0
                self.mu = threading.Lock()
            def preprocess(self, x):
                with self.mu:
                    self.pre_active += 1
                    self.pre_peak = max(self.pre_peak, self.pre_active)
                time.sleep(0.02)
                with self.mu:
                    self.pre_active -= 1
                return x
            def predict(self, x):
                with self.mu:
                    self.active += 1
                    self.peak = max(self.peak, self.active)
                time.sleep(0.005)
                with self.mu:
                    self.active -= 1
                return x
    """
    for size in (1, 2):
        tr = live(code, name=f"lock{size}", concurrency=size)
        results = tr.predict_batch(range(40), workers=20)
        assert [r.output for r in results] == list(range(40))
        assert tr.model.peak == size
        assert tr.model.pre_peak > size
        report = tr.report()
        assert report.max_lock_holders == size and report.count == 40
        assert tr.lock_available == size
        tr.close()  # one truss per process: the next one is loaded here too


def test_config_lock_size_and_override(live):
    tr = live(config={"runtime": {"predict_concurrency": 3}})
    assert tr.concurrency == 3 and tr.lock_available == 3
    tr.concurrency = 1
    assert tr.lock_available == 1
    with pytest.raises(truss_lab.TrussLabError, match="at least 1"):
        tr.concurrency = 0


def test_batch_keeps_order_and_errors(live):
    tr = live(
        """
        class Model:
            def predict(self, x):
                if x % 3 == 0:
                    raise ValueError(f"bad {x}")
                return x * 2
        """
    )
    results = tr.predict_batch(range(1, 10), workers=4)
    assert [r.output for r in results if r.ok] == [2, 4, 8, 10, 14, 16]
    assert [str(r.error).split(": ")[-1] for r in results if not r.ok] == ["bad 3", "bad 6", "bad 9"]
    assert tr.report().failures == {"predict": 3}


def test_traces_bounded(make_truss):
    with truss_lab.load(make_truss(), trace_capacity=5) as tr:
        for i in range(12):
            tr.predict(i)
        assert len(tr.traces) == 5
        assert [t.request_id for t in tr.traces] == list(range(8, 13))


def test_output_check_warns_with_path(live):
    pytest.importorskip("numpy")
    tr = live(
        """
        import numpy as np
        class Model:
            def predict(self, x):
                if x == "numpy":  # the Truss server's encoder sends these: no warning
                    return {"predictions": np.arange(3.0), "n": np.int64(3), "p": [np.float32(4)], "nan": float("nan")}
                if x == "objects":  # an object array is walked: its set is what the encoder refuses
                    return {"rows": np.array([1, {2}], dtype=object)}
                return {"predictions": [[1.0, np.float32(4), np.bool_(True)]], "ok": np.float64(1)}
        """
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tr.predict("numpy").ok
        r = tr.predict(None)
    assert r.ok
    messages = [str(w.message) for w in caught if issubclass(w.category, OutputWarning)]
    assert len(messages) == 1 and "predictions[0][2]: numpy.bool" in messages[0]
    with pytest.warns(OutputWarning, match=r"rows\[1\]: set"):
        tr.predict("objects")
    assert r.trace.warnings == messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        live("class Model:\n    def predict(self, x):\n        return {'a': [1, 'b', None, True, 2.5]}\n", name="clean").predict(1)


@pytest.mark.filterwarnings("ignore::truss_lab.LockMisuseWarning")  # a sleeping predict, on purpose
def test_report_figures_match_durations(live):
    tr = live(
        """
        import time
        class Model:
            def preprocess(self, x):
                time.sleep(0.01)
                return x
            def predict(self, x):
                time.sleep(0.02)
                return x
        """
    )
    results = tr.predict_batch(range(12), workers=4)
    report = tr.report()
    assert report.count == 12 and not report.failures
    assert 20 <= report.stages["predict"].p50 < 60
    assert 10 <= report.stages["preprocess"].p50 < 50
    assert report.bound == pytest.approx(1000 / report.stages["predict"].mean, rel=1e-6)
    # 4 workers, predict dominates: the lock is busy most of the time
    assert 0.6 < report.lock_utilization <= 1.0
    assert 0.5 < report.efficiency <= 1.05
    text = report.table()
    for word in ("p50", "p95", "p99", "throughput", "bound", "efficiency", "lock utilization"):
        assert word in text
    assert len(results) == 12


def test_max_concurrent():
    assert max_concurrent([]) == 0
    assert max_concurrent([(0, 1), (1, 2)]) == 1  # touching intervals do not overlap
    assert max_concurrent([(0, 3), (1, 2), (1.5, 4)]) == 3


def test_many_threads_calling_predict_directly(live):
    tr = live()
    out = {}

    def work(i):
        out[i] = tr.predict(i).output

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert out == {i: {"post": {"pred": {"pre": i}}} for i in range(16)}
    assert len({t.thread for t in tr.traces}) == 16


def test_stream_decided_by_the_returned_value(live):
    """As on a Truss server: a generator *returned* by predict (sync or async) streams; anything else does not."""
    tr = live(
        """
        class Model:
            async def predict(self, x):
                if x == "plain":
                    return {"plain": True}
                async def gen():
                    for i in range(3):
                        yield f"{i},"
                return gen()
        """
    )
    assert list(tr.stream("go")) == ["0,", "1,", "2,"]
    assert tr.traces[-1].chunks == 3 and tr.traces[-1].first_chunk is not None
    assert list(tr.stream("plain")) == [{"plain": True}]
    assert tr.predict("go").output == "0,1,2,"  # joined as the Truss server gathers for Accept: application/json
    assert tr.lock_available == 1


def test_generator_with_postprocess_loads_warns_and_fails_each_request(live):
    """Truss loads this model and answers every request with a 500: truss_lab does too, and says so at load."""
    from truss_lab.wrapper import ModelDefinitionWarning

    with pytest.warns(ModelDefinitionWarning, match=r"model\.py:4: predict is a generator .* every request will fail"):
        tr = live("class Model:\n    def predict(self, x):\n        yield x\n    def postprocess(self, y):\n        return y\n")
    r = tr.run(1)
    assert r.error is not None and r.error.stage == "predict"
    assert "you cannot use postprocessing" in str(r.error)
    assert tr.lock_available == 1


@pytest.mark.parametrize("process", ["kernel", "worker"])
def test_an_output_warning_is_given_once_at_the_models_own_method(tmp_path, process):
    """A bench of a model whose output the Truss server cannot send warns once (not once a request),
    at the model's `def postprocess` - never at truss_lab's line; every Trace still carries it."""
    import warnings

    model = ("import numpy as np\nclass Model:\n    def predict(self, x):\n        return x\n\n"
             "    def postprocess(self, y):\n        return {'ok': np.bool_(True)}\n")
    root = write_truss(tmp_path / "np", model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with truss_lab.load(root, process=process) as tr:
            report = tr.bench([1], n=20, concurrency=4, progress=False)
            assert all(t.warnings for t in report.traces)
    given = [w for w in caught if issubclass(w.category, truss_lab.OutputWarning)]
    assert len(given) == 1, [str(w.message) for w in given]
    assert given[0].filename == str(root / "model" / "model.py") and given[0].lineno == 6
