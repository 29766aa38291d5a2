import json
from pathlib import Path
import subprocess
import sys

import pytest

from truss_lab.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_then_predict_then_bench(tmp_path, capsys):
    path = str(tmp_path / "m")
    code, out, _ = run(capsys, "init", path, "--name", "demo")
    assert code == 0 and "wrote a new Truss" in out
    code, out, err = run(capsys, "predict", path, "--input", "[[1, 2], [3, 4]]")
    assert code == 0
    assert json.loads(out) == {"predictions": [[1, 2], [3, 4]]}
    for stage in ("preprocess", "lock wait", "predict", "postprocess", "total"):
        assert stage in err
    code, out, _ = run(capsys, "predict", path, "--example", "example")
    assert code == 0 and json.loads(out) == {"predictions": [1, 2, 3]}
    code, out, err = run(capsys, "bench", path, "-n", "30", "-c", "4")
    assert code == 0
    assert out.startswith("bench demo with 4 workers\n30 requests, 30 ok") and "throughput" in out and "p95" in out
    assert "30/30" in err  # tqdm's text bar, on stderr so stdout stays the report
    code, out, err = run(capsys, "bench", path, "-n", "5", "--no-progress")
    assert code == 0 and "5 requests, 5 ok" in out and "5/5" not in err


def test_input_from_file(tmp_path, capsys, make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        return len(x) if isinstance(x, bytes) else x\n")
    (tmp_path / "in.json").write_text('{"a": 1}')
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    assert json.loads(run(capsys, "predict", str(root), "--input", f"@{tmp_path / 'in.json'}")[1]) == {"a": 1}
    assert json.loads(run(capsys, "predict", str(root), "--input", f"@{tmp_path / 'img.png'}")[1]) == 10


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["predict", "{missing}", "--input", "1"], 2, "no such Truss folder"),
        (["predict", "{root}", "--input", "not json"], 2, "--input: not valid JSON"),
        (["predict", "{root}", "--input", "@/no/such/file"], 2, "cannot read"),
        (["predict", "{root}", "--example", "nope"], 2, "no example named 'nope'"),
        (["predict", "{root}", "--input", "1", "--lock", "0"], 2, "concurrency must be at least 1"),
        (["predict", "{root}", "--input", "0"], 1, "predict failed at t/model/model.py:3: ZeroDivisionError"),
        (["bench", "{root}", "-n", "5", "--input", "0"], 1, None),
        (["init", "{root}"], 2, "already exists"),
    ],
)
def test_exit_codes_and_messages(tmp_path, capsys, make_truss, argv, code, message):
    root = make_truss("class Model:\n    def predict(self, x):\n        return 1 / x\n", examples=[{"name": "one", "input": 1}])
    argv = [a.format(root=root, missing=tmp_path / "missing") for a in argv]
    got, out, err = run(capsys, *argv)
    assert got == code
    if message:
        assert message in err
        assert "Traceback" not in err


def test_bad_config_is_usage_error(capsys, make_truss):
    root = make_truss(config={"runtime": {"predict_concurrency": "x"}})
    code, _, err = run(capsys, "predict", str(root), "--input", "1")
    assert code == 2 and "runtime.predict_concurrency" in err and len(err.strip().splitlines()) == 1


def test_broken_model_is_model_error(capsys, make_truss):
    root = make_truss("class Model:\n    def predict(self, x)\n        return x\n")
    code, _, err = run(capsys, "predict", str(root), "--input", "1")
    assert code == 1 and "model/model.py:2" in err and "SyntaxError" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict"])
    assert info.value.code == 2


def test_console_script_installed(tmp_path):
    exe = str(Path(sys.executable).parent / "truss-lab")
    proc = subprocess.run([exe, "init", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([exe, "predict", str(tmp_path / "x"), "--input", "[5]"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"predictions": [5]}
