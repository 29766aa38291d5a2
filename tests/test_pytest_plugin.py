"""Issue 33 (its pytest part): truss_lab's pytest plugin, tried with pytester in fresh pytest processes -
the `truss` fixture, `--truss PATH` and the `truss_examples` ini option."""

from __future__ import annotations

import json

import pytest

from conftest import write_truss

pytest_plugins = ["pytester"]

MODEL = """
import os

from model.helpers import top


class Model:
    def load(self):
        with open(os.environ["LOADS_FILE"], "a") as f:
            f.write("load\\n")
        self.scores = {"cat": 0.7, "dog": 0.2, "eel": 0.1}

    def predict(self, x):
        if x.get("boom"):
            return top(None)
        return {"labels": top(self.scores)[: x.get("k", 2)], "score": self.scores["cat"] * x.get("scale", 1.0)}
"""

HELPERS = """
def top(scores):
    return sorted(scores, key=scores.get, reverse=True)
"""

EXAMPLES = [{"name": "two", "input": {"k": 2}}, {"name": "one", "input": {"k": 1}},
            {"name": "broken", "input": {"boom": True}}]


@pytest.fixture
def project(pytester, monkeypatch):
    loads = pytester.path / "loads.txt"
    loads.write_text("")
    monkeypatch.setenv("LOADS_FILE", str(loads))
    write_truss(pytester.path / "pets", MODEL, examples=EXAMPLES, files={"model/helpers.py": HELPERS})
    return pytester, loads


def test_the_truss_fixture_loads_each_truss_once_a_session_and_closes_it(project):
    pytester, loads = project
    pytester.makepyfile(test_pets="""
        from truss_lab import loader

        def test_top_two(truss):
            tr = truss("pets")
            assert tr.predict({"k": 2}).output["labels"] == ["cat", "dog"]
            assert tr.process == "kernel" and loader.resident() is not None

        def test_the_same_model(truss):
            tr = truss("pets")
            assert tr.predict({"k": 1}).output["labels"] == ["cat"]
            assert tr is truss("pets")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert loads.read_text().count("load") == 1  # once for the session, whatever the number of tests


def test_truss_alone_runs_each_example_and_reports_a_failure_by_stage_and_line(project):
    pytester, _ = project
    pytester.makepyfile(test_unrelated="def test_never_collected():\n    assert False\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--truss", "pets", "-v")
    result.assert_outcomes(passed=2, failed=1)  # only the examples: `pytest --truss PATH` asks for those
    result.stdout.fnmatch_lines(["*examples.yaml::two PASSED*", "*examples.yaml::one PASSED*",
                                 "*examples.yaml::broken FAILED*"])
    text = result.stdout.str()
    assert "predict failed at pets/model/helpers.py:3: AttributeError" in text, text
    assert "truss_lab/" not in text  # the model's error, never truss_lab's traceback


def test_an_example_that_no_longer_matches_its_snapshot_says_what_changed(project):
    pytester, _ = project
    snapshot = {"two": {"ok": True, "output": {"labels": ["cat", "dog"], "score": 0.7}},
                "one": {"ok": True, "output": {"labels": ["dog"], "score": 0.7}},
                "broken": {"ok": False, "error": "predict failed", "stage": "predict"}}
    (pytester.path / "pets" / "examples.snapshot.json").write_text(json.dumps(snapshot))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--truss", "pets", "-k", "not broken")
    result.assert_outcomes(passed=1, failed=1, deselected=1)
    result.stdout.fnmatch_lines(['*one: changed*labels[[]0[]]: "dog" -> "cat"*rtol=0.0001*'])


def test_the_ini_option_adds_the_examples_to_the_projects_own_tests_within_its_tolerance(project):
    pytester, _ = project
    snapshot = {"two": {"ok": True, "output": {"labels": ["cat", "dog"], "score": 0.70001}},
                "one": {"ok": True, "output": {"labels": ["cat"], "score": 0.7}}}
    (pytester.path / "pets" / "examples.snapshot.json").write_text(json.dumps(snapshot))
    pytester.makeini("[pytest]\ntruss_examples = pets\ntruss_rtol = 1e-3\n")
    pytester.makepyfile(test_mine="def test_mine():\n    assert True\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "not broken")
    result.assert_outcomes(passed=3, deselected=1)  # the project's test and two examples (0.70001 is within 1e-3)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "not broken", "--truss-rtol", "1e-7")
    result.assert_outcomes(passed=2, failed=1, deselected=1)  # the command line's tolerance wins


def test_a_folder_that_is_no_truss_is_a_one_line_usage_error(project):
    pytester, _ = project
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--truss", "nowhere")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--truss */nowhere: not a truss folder (no config.yaml)*"])
