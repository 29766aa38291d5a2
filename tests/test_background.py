"""`make test &` from a script, nohup, cron: there SIGINT is ignored, and every process the test run
starts inherits that. The tests that interrupt something (a kernel's stop button, Ctrl-C on `truss-lab
serve`) must still test it: each gives the process it signals SIGINT's default handling first."""

from __future__ import annotations

import signal
import subprocess
import sys

from conftest import ROOT

INTERRUPTING = [
    "tests/test_runner.py::test_real_interrupt_while_waiting_in_async_predict",
    "tests/test_hardening.py::test_an_interrupted_async_call_returns_only_once_its_coroutine_stopped",
    "tests/serving/test_check.py::test_ctrl_c_during_an_install_stops_pip_too",
    "tests/serving/test_serve.py::test_cli_serve_is_live_at_once_and_ready_after_load",
    "tests/test_chains.py::test_truss_lab_serve_of_a_chain_answers_and_reloads_on_save",
]  # (tests/serving/test_ray_cli.py does the same; Ray's start-up is too slow to run twice)


def test_tests_that_send_sigint_pass_with_sigint_ignored_as_in_a_background_job():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *INTERRUPTING],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # what `&` in a script gives a job
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"{len(INTERRUPTING)} passed" in out.stdout
