"""scripts/bench.py: the per-suite child-process protocol (with a fake suite), compare(), markdown and the docs
table blocks. No timings are asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

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
bench.CHILD_SCRIPT = __import__("pathlib").Path(__file__)
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
    for module in _bench().all_suites().values():
        assert "\ndef run(" in (SCRIPT.parent / f"{module}.py").read_text(), module


# ---- the quiet-machine rule -------------------------------------------------------------------------------------

def _report_with_load(one_minute: float) -> dict:
    report = json.loads(json.dumps(REPORT))
    report["load"] = {"data": {"start": [0.1, 0.1, 0.1], "end": [one_minute, 0.5, 0.5], "cores": 2},
                      "pipeline": {"start": [0.2, 0.1, 0.1], "end": [0.3, 0.2, 0.1], "cores": 2}}
    return report


def test_load_limit_is_own_threads_plus_a_fraction_of_the_cores():
    bench = _bench()
    assert bench.load_limit({"threads": 2, "cores": 2}) == 2 + bench.LOAD_EXCESS * 2
    assert bench.load_limit({"threads": 1, "cores": 16}, excess=0.5) == 9.0


def test_loaded_suites_names_each_loaded_or_unrecorded_suite():
    bench = _bench()
    limit = bench.load_limit(REPORT["machine"])
    assert bench.loaded_suites(_report_with_load(limit)) == {}  # at the limit: still quiet
    loaded = bench.loaded_suites(_report_with_load(limit + 0.5))
    assert list(loaded) == ["data"] and f"1-min load {limit + 0.5:g} > {limit:g}" in loaded["data"]
    assert set(bench.loaded_suites(REPORT)) == {"data", "pipeline"}  # a report from before the rule: no record


def _table_run(tmp_path, report: dict, *flags: str) -> tuple[int, str]:
    source, doc = tmp_path / "run.json", tmp_path / "benchmarks.md"
    source.write_text(json.dumps(report))
    doc.write_text("<!-- bench:data -->\nold data table\n<!-- /bench:data -->\n")
    code = _bench().main(["--from", str(source), "--table", str(doc), *flags])
    return code, doc.read_text()


def test_table_refuses_a_loaded_run_and_leaves_the_docs_unchanged(tmp_path, capsys):
    code, text = _table_run(tmp_path, _report_with_load(7.5))
    assert code == 2 and text == "<!-- bench:data -->\nold data table\n<!-- /bench:data -->\n"
    assert "refusing to write tables: suite 'data': 1-min load 7.5" in capsys.readouterr().err


def test_table_from_a_loaded_run_with_allow_loaded_marks_the_tables(tmp_path):
    code, text = _table_run(tmp_path, _report_with_load(7.5), "--allow-loaded")
    assert code == 0 and "old data table" not in text
    assert "**On a loaded machine (1-min load 7.5 >" in text and "| data/x | images_per_s | 1235 | img/s |" in text


def test_table_from_a_quiet_run_is_written_unmarked(tmp_path):
    code, text = _table_run(tmp_path, _report_with_load(1.0))
    assert code == 0 and "| data/x |" in text and "loaded machine" not in text


def test_a_run_records_the_load_at_start_and_end_of_each_suite(fake_script, tmp_path):
    out = tmp_path / "run.json"
    subprocess.run([sys.executable, str(fake_script()), "--only", "fake", "--out", str(out)], check=True,
                   capture_output=True)
    load = json.loads(out.read_text())["load"]["fake"]
    assert len(load["start"]) == len(load["end"]) == 3 and load["cores"] >= 1
    assert all(isinstance(x, float) for x in load["start"] + load["end"])


# ---- pure parts of the suites -----------------------------------------------------------------------------------

def _common():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_common

    return bench_common


def test_step_rows_use_three_times_the_forward_flops_per_item():
    rows = {r["metric"]: r["value"] for r in _common().step_rows("w", 10, 2e9, 4, [2.0, 1.0, 3.0], {"gap": 0.01})}
    assert rows["step_gflop"] == 24.0 and rows["step_s"] == 2.0 and rows["step_s_min"] == 1.0
    assert rows["achieved_gflop_s"] == 12.0 and rows["fwd_gflop_per_item"] == 2.0 and rows["gap"] == 0.01


def test_closest_picks_the_nearest_candidate_and_its_gap():
    assert _common().closest({48: 2.0, 56: 2.9, 60: 3.37, 64: 3.8}, 3.47) == (60, pytest.approx(3.37 / 3.47 - 1))


def test_count_flops_counts_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert _common().count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_matmul_ceiling_rows_report_positive_fp32_gflops():
    rows = _common().matmul_ceiling_rows(seconds=0.05)
    assert rows[0]["metric"] == "fp32_gflop_s" and rows[0]["value"] > 0
    assert rows[0]["workload"] == f"machine/matmul_ceiling/{torch.get_num_threads()}threads"


def test_compare_ref_without_dalle2_pytorch_names_the_bench_env():
    code = (f"import sys; sys.modules['dalle2_pytorch'] = None; sys.path.insert(0, {str(SCRIPT.parent)!r}); "
            "import bench_compare_ref")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "compare_ref needs DALLE2-pytorch: run scripts/bench_env.sh" in proc.stderr


def test_runner_step_intervals_drop_the_warm_up():
    assert _common().step_intervals([0.0, 5.0, 6.0, 7.5, 8.5], warmup=2) == [1.5, 1.0]


def test_switch_variants_each_change_one_setting_from_the_baseline():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_switches as sw

    singles = {k: v for k, v in sw.VARIANTS.items() if k not in ("baseline", "cheap_switches_together")}
    for name, change in singles.items():
        assert len(change) == 1 and change != {k: sw.BASELINE[k] for k in change}, name
    assert sw.optimizer_kwargs("single") == {"foreach": False} and sw.optimizer_kwargs("fused") == {"fused": True}
