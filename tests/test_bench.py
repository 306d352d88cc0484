"""scripts/bench.py: the per-suite child-process protocol (with a fake suite), compare(), markdown and the docs
table blocks. No timings are asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAKE_SUITE = '''
def run(quick=False):
    print("stray output a suite might print")  # must not reach the parent's JSON
    if FAIL:
        raise RuntimeError("boom")
    return [{"workload": "fake/op", "metric": "seconds", "value": 0.5 if quick else 1.0, "unit": "s"}]
'''

WRAPPER = '''
import sys
sys.path.insert(0, {folder!r})
sys.path.insert(0, {scripts!r})
import bench
bench.SUITES = {{"fake": "fake_suite"}}
sys.exit(bench.main())
'''


@pytest.fixture
def fake_script(tmp_path):
    """A copy of bench.py's entry point whose only suite is ``fake`` (tmp_path/fake_suite.py)."""

    def make(fail: bool = False):
        (tmp_path / "fake_suite.py").write_text(f"FAIL = {fail}\n" + FAKE_SUITE)
        wrapper = tmp_path / "bench_wrapper.py"
        wrapper.write_text(WRAPPER.format(folder=str(tmp_path), scripts=str(SCRIPT.parent)))
        return wrapper

    return make


def test_child_prints_its_rows_and_own_peak_rss_as_one_json_line(fake_script):
    proc = subprocess.run([sys.executable, str(fake_script()), "--child", "fake", "--quick"], capture_output=True,
                          text=True, check=True)
    rows = json.loads(proc.stdout)  # stdout is the rows and nothing else
    assert rows[0] == {"workload": "fake/op", "metric": "seconds", "value": 0.5, "unit": "s"}
    assert rows[-1]["workload"] == "fake" and rows[-1]["metric"] == "peak_rss" and rows[-1]["value"] > 0
    assert "stray output" in proc.stderr


def test_run_suite_tags_rows_and_adds_wall_time(fake_script):
    rows = _bench().run_suite("fake", quick=False, script=fake_script())
    assert {r["suite"] for r in rows} == {"fake"}
    assert [(r["workload"], r["metric"]) for r in rows] == [("fake/op", "seconds"), ("fake", "peak_rss"),
                                                             ("fake", "suite_wall")]
    assert rows[0]["value"] == 1.0


def test_failing_suite_raises_naming_it(fake_script):
    with pytest.raises(RuntimeError, match="suite 'fake' failed"):
        _bench().run_suite("fake", quick=True, script=fake_script(fail=True))


def test_compare_gives_ratios_for_shared_numeric_rows():
    old = [{"workload": "a", "metric": "s", "value": 2.0}, {"workload": "b", "metric": "s", "value": 0},
           {"workload": "c", "metric": "s", "value": "n/a"}, {"workload": "gone", "metric": "s", "value": 1.0}]
    new = [{"workload": "a", "metric": "s", "value": 3.0}, {"workload": "b", "metric": "s", "value": 1.0},
           {"workload": "c", "metric": "s", "value": 1.0}, {"workload": "new", "metric": "s", "value": 1.0}]
    assert _bench().compare(new, old) == [{"workload": "a", "metric": "s", "old": 2.0, "new": 3.0, "ratio": 1.5}]


REPORT = {"date": "2026-01-02T03:04:05+00:00", "quick": False,
          "machine": {"host": "h", "cpu": "x86_64", "cores": 2, "python": "3.11", "torch": "2.x", "threads": 2,
                      "gpu": None, "load_avg": [0.1, 0.2, 0.3]},
          "results": [{"suite": "data", "workload": "data/x", "metric": "images_per_s", "value": 1234.5678,
                       "unit": "img/s"},
                      {"suite": "data", "workload": "data", "metric": "peak_rss", "value": 512.0, "unit": "MiB"},
                      {"suite": "pipeline", "workload": "pipeline/t2i", "metric": "s_per_image", "value": 3,
                       "unit": "s"}]}


def test_markdown_has_machine_date_and_a_table_per_suite():
    text = _bench().markdown(REPORT)
    assert "**Machine**: 2 CPU cores (x86_64), no GPU" in text and "**Date**: 2026-01-02T03:04:05+00:00" in text
    assert "### data" in text and "### pipeline" in text
    assert "| data/x | images_per_s | 1235 | img/s |" in text


def test_table_blocks_are_rewritten_and_others_kept():
    doc = ("# Benchmarks\n\nprose\n\n<!-- bench:machine -->\nold machine\n<!-- /bench:machine -->\n\n"
           "<!-- bench:data -->\nold data table\n<!-- /bench:data -->\n\nmore prose\n\n"
           "<!-- bench:decoder -->\nkept: not in this report\n<!-- /bench:decoder -->\n")
    text, done = _bench().fill_tables(doc, REPORT)
    assert sorted(done) == ["data", "machine"]
    assert "old machine" not in text and "old data table" not in text
    assert "kept: not in this report" in text and "prose" in text and "more prose" in text
    assert "| data | peak_rss | 512 | MiB |" in text and "_Measured 2026-01-02T03:04:05+00:00._" in text
    again, _ = _bench().fill_tables(text, REPORT)
    assert again == text  # idempotent


def test_every_suite_names_a_script_with_run():
    for module in _bench().SUITES.values():
        assert "\ndef run(" in (SCRIPT.parent / f"{module}.py").read_text(), module
