"""unclip's benchmark suite: run every workload, write JSON, compare against an earlier run, render the docs tables.

    python scripts/bench.py --out bench.json                    # every suite, each in a process of its own
    python scripts/bench.py --only data pipeline --quick        # a subset, fewer repeats (a smoke run)
    python scripts/bench.py --out new.json --compare old.json   # ratios new/old per (workload, metric)
    python scripts/bench.py --out bench.json --table docs/benchmarks.md   # run, then rewrite the docs tables
    python scripts/bench.py --from bench.json --table docs/benchmarks.md  # rewrite them from an earlier run
    python scripts/bench.py --from bench.json --markdown        # print the tables (machine and date on top)
    python scripts/bench.py --child SUITE [--quick]             # one suite; its rows as one JSON line on stdout
    .bench-env/bin/python scripts/bench.py --compare-ref --out ref.json   # DALLE2-pytorch and ours, same run
    python scripts/bench.py --only step_switches runner_overhead  # the efficiency switches, the runner's overhead

Each suite (scripts/bench_<suite>.py, ``run(quick) -> [{"workload", "metric", "value", "unit"}]``) runs in a
child process (``--child``), which appends the row {"workload": SUITE, "metric": "peak_rss"}: that process's own
peak resident set, so one suite's memory or allocator and thread state never leaks into the next. Suites whose
workloads differ a lot in memory also run each workload in a spawned process of its own and report its peak
(scripts/bench_common.py). The parent adds {"workload": SUITE, "metric": "suite_wall"} (seconds, process start
included) and tags every row with its suite.

Run it with nothing else on the machine: on 2 cores a second busy process slows torch ops many times. The quiet
rule is enforced: every suite records ``os.getloadavg()`` at its start and end (``report["load"]``), and ``--table``
refuses to write docs tables from a report whose 1-minute load exceeded :func:`load_limit` in any suite, unless
``--allow-loaded`` (the tables are then marked as measured on a loaded machine).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# suite -> module in scripts/, in run order (cheap and memory-light first)
SUITES = {"data": "bench_data", "diffusion": "bench_diffusion", "clip": "bench_clip", "prior": "bench_prior",
          "decoder": "bench_decoder", "upsampler": "bench_upsampler", "pipeline": "bench_pipeline",
          "demo": "bench_demo", "metrics": "bench_metrics", "embeddings": "bench_embeddings"}
# suites run only when named (--only / --compare-ref): the reference needs the bench env (scripts/bench_env.sh);
# the switch and runner suites are measurements for tuning, not the published tables
EXTRA_SUITES = {"compare_ref": "bench_compare_ref", "step_switches": "bench_switches",
                "runner_overhead": "bench_runner"}
# Foreign load tolerated while a suite runs, as a fraction of the cores, above the benchmark's own torch threads.
# The 1-minute load average counts runnable threads: the benchmark's own account for up to ``threads`` (the start
# reading also carries the previous suite's, which used as many); one more busy thread on a 2-core machine already
# slows small torch ops several times, so the margin (0.5 of a core on 2 cores) admits only brief noise.
LOAD_EXCESS = 0.25


def machine() -> dict:
    import torch

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def all_suites() -> dict[str, str]:
    return {**SUITES, **EXTRA_SUITES}


def run_child(name: str, quick: bool, suites: dict[str, str] | None = None) -> list[dict]:
    """Run one suite in this process and append its peak RSS row (``--child``).

    Anything the suite prints goes to stderr, so stdout carries only the rows.
    """
    import resource

    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT))
    with contextlib.redirect_stdout(sys.stderr):
        rows = list(importlib.import_module((suites or all_suites())[name]).run(quick=quick))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return rows + [{"workload": name, "metric": "peak_rss", "value": round(peak, 1), "unit": "MiB"}]


CHILD_SCRIPT = Path(__file__)  # what run_suite starts with --child (a test's wrapper replaces it)


def run_suite(name: str, quick: bool, script: Path | None = None) -> list[dict]:
    """Run one suite in a child process (``script --child name``) and return its rows, tagged with the suite.

    :raises RuntimeError: when the child fails or prints no rows (its stderr has already been shown).
    """
    cmd = [sys.executable, str(script or CHILD_SCRIPT), "--child", name] + (["--quick"] if quick else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode or not lines:
        raise RuntimeError(f"suite {name!r} failed (exit {proc.returncode}): {' '.join(cmd)}")
    rows = json.loads(lines[-1])
    rows.append({"workload": name, "metric": "suite_wall", "value": round(wall, 1), "unit": "s"})
    return [{"suite": name, **row} for row in rows]


def compare(new: list[dict], old: list[dict]) -> list[dict]:
    """Ratio new/old for each (workload, metric) present in both with numeric, non-zero old values."""
    before = {(r["workload"], r["metric"]): r["value"] for r in old}
    out = []
    for r in new:
        prev = before.get((r["workload"], r["metric"]))
        if isinstance(prev, (int, float)) and prev and isinstance(r["value"], (int, float)):
            out.append({"workload": r["workload"], "metric": r["metric"], "old": prev, "new": r["value"],
                        "ratio": round(r["value"] / prev, 3)})
    return out


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def load_limit(machine_info: dict, excess: float = LOAD_EXCESS) -> float:
    """The highest 1-minute load average a quiet run may show: the benchmark's own threads plus ``excess`` x cores."""
    return machine_info["threads"] + excess * machine_info["cores"]


def loaded_suites(report: dict, excess: float = LOAD_EXCESS) -> dict[str, str]:
    """Suites of ``report`` not measured on a quiet machine, each with the reason: a 1-minute load average above
    :func:`load_limit` at the suite's start or end, or no load record at all (a report from before the rule)."""
    limit = load_limit(report["machine"], excess)
    records = report.get("load", {})
    out = {}
    for suite in _by_suite(report):
        record = records.get(suite)
        if record is None:
            out[suite] = "no load average recorded"
            continue
        worst = max(record["start"][0], record["end"][0])
        if worst > limit:
            out[suite] = f"1-min load {worst:g} > {limit:g} ({report['machine']['threads']} threads + " \
                         f"{excess:g} x {report['machine']['cores']} cores)"
    return out


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def machine_line(report: dict) -> str:
    """One line naming the machine and date of a report."""
    m = report["machine"]
    gpu = m.get("gpu") or "no GPU"
    load = "/".join(_fmt(x) for x in m.get("load_avg", []))
    return (f"**Machine**: {m['cores']} CPU cores ({m['cpu']}), {gpu}, Python {m['python']}, torch {m['torch']} "
            f"({m['threads']} threads), load average at start {load or 'n/a'}. **Date**: {report['date']}"
            f"{' (quick mode)' if report.get('quick') else ''}.")


def suite_table(rows: list[dict]) -> str:
    lines = ["| workload | metric | value | unit |", "|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['metric']} | {_fmt(r['value'])} | {r.get('unit', '')} |" for r in rows]
    return "\n".join(lines)


def _by_suite(report: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in report["results"]:
        out.setdefault(row.get("suite", "results"), []).append(row)
    return out


def markdown(report: dict) -> str:
    """The machine and date lines, then one table per suite."""
    parts = [machine_line(report)]
    for suite, rows in _by_suite(report).items():
        parts += [f"### {suite}", suite_table(rows)]
    return "\n\n".join(parts) + "\n"


def fill_tables(text: str, report: dict, loaded: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Replace the blocks ``<!-- bench:NAME -->`` … ``<!-- /bench:NAME -->`` of a markdown document: ``machine``
    gets :func:`machine_line`, each suite its table headed by the run's date. Blocks of suites absent from the
    report are left as they are. Suites named in ``loaded`` (see :func:`loaded_suites`) are headed as measured on
    a loaded machine, with the reason.

    :return: the new text and the names of the blocks replaced.
    """
    loaded = loaded or {}
    blocks = {"machine": machine_line(report)}
    for suite, rows in _by_suite(report).items():
        mark = f" **On a loaded machine ({loaded[suite]}): not for comparison.**" if suite in loaded else ""
        blocks[suite] = f"_Measured {report['date']}._{mark}\n\n{suite_table(rows)}"
    done = []

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in blocks:
            return match.group(0)
        done.append(name)
        return f"<!-- bench:{name} -->\n{blocks[name]}\n<!-- /bench:{name} -->"

    return re.sub(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->", replace, text, flags=re.S), done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(all_suites()), default=list(SUITES), help="suites to run")
    parser.add_argument("--compare-ref", action="store_true",
                        help="run the DALLE2-pytorch comparison (same as --only compare_ref; needs the bench env)")
    parser.add_argument("--allow-loaded", action="store_true",
                        help="let --table write tables from a loaded run (they are marked as such)")
    parser.add_argument("--load-excess", type=float, default=LOAD_EXCESS,
                        help="foreign load tolerated, as a fraction of the cores above the own threads")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier; a smoke run)")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--from", dest="source", type=Path, help="use this results JSON instead of running")
    parser.add_argument("--compare", type=Path, help="an earlier results JSON: print and store ratios new/old")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables instead of the JSON")
    parser.add_argument("--table", type=Path, help="rewrite the <!-- bench:NAME --> blocks of this markdown file")
    parser.add_argument("--child", choices=list(all_suites()), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compare_ref:
        args.only = ["compare_ref"]
    if args.child:
        print(json.dumps(run_child(args.child, args.quick)), flush=True)
        return 0
    if args.source:
        report = json.loads(args.source.read_text())
    else:
        report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                  "quick": args.quick, "results": [], "failed": [], "load": {}}
        for name in args.only:
            print(f"# {name} ...", file=sys.stderr, flush=True)
            start = load_now()
            try:
                report["results"] += run_suite(name, args.quick)
            except RuntimeError as err:
                print(f"# {err}", file=sys.stderr, flush=True)
                report["failed"].append(name)
            report["load"][name] = {"start": start, "end": load_now(), "cores": report["machine"]["cores"]}
    if args.compare:
        report["comparison"] = compare(report["results"], json.loads(args.compare.read_text())["results"])
        for r in report["comparison"]:
            print(f"{r['workload']:50s} {r['metric']:24s} {_fmt(r['old']):>10} -> {_fmt(r['new']):>10}  "
                  f"x{r['ratio']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.table:
        loaded = loaded_suites(report, args.load_excess)
        if loaded and not args.allow_loaded:
            for suite, why in loaded.items():
                print(f"# refusing to write tables: suite {suite!r}: {why}", file=sys.stderr)
            print(f"# {args.table} left unchanged; rerun on a quiet machine or pass --allow-loaded", file=sys.stderr)
            return 2
        text, done = fill_tables(args.table.read_text(), report, loaded)
        args.table.write_text(text)
        print(f"# {args.table}: rewrote blocks {done}", file=sys.stderr)
    if args.markdown:
        print(markdown(report))
    elif not (args.out or args.table or args.compare):
        print(json.dumps(report, indent=1))
    return 1 if report.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
