"""The magics in a real ipykernel (what JupyterLab runs): the watcher's notice reaches the notebook."""

import queue
import time

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

from jupyter_client.manager import start_new_kernel


@pytest.fixture
def kernel():
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def execute(kc, code: str, timeout: float = 60) -> list[dict]:
    """Run `code`; return its iopub messages up to idle (fails on an error reply)."""
    msg_id = kc.execute(code)
    messages = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    reply = kc.get_shell_msg(timeout=timeout)
    assert reply["content"]["status"] == "ok", reply["content"]
    return messages


def test_watcher_notice_updates_the_load_cell(kernel, make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        return 'one'\n")
    messages = execute(kernel, f"%load_ext truss_lab\n%truss load {root}")
    displays = [m for m in messages if m["msg_type"] == "display_data"]
    notice = next(m for m in displays if m["content"].get("transient", {}).get("display_id"))
    display_id = notice["content"]["transient"]["display_id"]
    assert "watching for edits" in notice["content"]["data"]["text/plain"]

    (root / "model" / "model.py").write_text("class Model:\n    def predict(self, x):\n        return 'two'\n")
    deadline = time.monotonic() + 20
    update = None
    while update is None and time.monotonic() < deadline:
        try:
            msg = kernel.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["msg_type"] == "update_display_data" and msg["content"]["transient"]["display_id"] == display_id:
            update = msg
    assert update is not None, "the notebook got no notice of the reload"
    assert "v2: swapped predict" in update["content"]["data"]["text/plain"]
    out = execute(kernel, "%truss predict 0")
    result = next(m for m in out if m["msg_type"] == "display_data")
    assert '"two"' in result["content"]["data"]["text/plain"]
    assert "truss-lab-result" in result["content"]["data"]["text/html"]


def test_make_lab_kernels_start_with_the_example_truss(tmp_path):
    """`make lab`'s kernels: `digits` is loaded and watched before the first cell; the magics find it."""
    pytest.importorskip("tensorflow")
    from truss_lab.devtools.lab import lab_environment, write_profile

    ipython_dir = tmp_path / "ipython"
    write_profile(ipython_dir)
    km, kc = start_new_kernel(kernel_name="python3", env=lab_environment(ipython_dir))
    try:
        messages = execute(kc, "import truss_lab\nprint(isinstance(digits, truss_lab.LiveModel), digits.name, digits.watching, digits.process)"
                               "\n%load_ext truss_lab\n%truss predict example:three", timeout=120)
        text = "".join(m["content"].get("text", "") for m in messages if m["msg_type"] == "stream")
        assert "True digits True worker" in text  # in a worker: the kernel stays free for the truss you load
        results = [m["content"]["data"]["text/plain"] for m in messages if m["msg_type"] == "display_data"]
        assert results and results[0].startswith("Result from digits v1: ok") and '"three"' in results[0]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
