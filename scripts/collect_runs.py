"""Collect a sweep's results into one table: one row per job, its overrides, then its metrics.

    python scripts/collect_runs.py multirun/prior/2025-01-01_12-00-00 --csv table.csv --md table.md
    python scripts/collect_runs.py runs/eval/guidance      # after unclip-eval -m out_dir=runs/eval/guidance ...

A job is a folder holding ``.hydra/overrides.yaml`` (what ``unclip-train -m`` writes in each job's run_dir) or a
``metrics.json`` / ``report.json`` (an ``unclip-eval`` report lists its overrides itself: each ``unclip-eval -m``
job writes one in ``out_dir/N``). Columns: ``job`` (the folder relative to the sweep dir),
``status`` (``ok``, or ``no results`` for a job that wrote neither file), every override key (those that vary
across jobs first), then every metric: ``metrics.json`` keys as written (``val/loss``, ``global_step``) and
``report.json`` keys under ``report.`` with nested keys joined by dots (``report.fid``, ``report.steps.prior``).
Markdown goes to stdout unless ``--md`` names a file.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml

RESULT_FILES = ("metrics.json", "report.json")


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts → ``{"a.b.c": leaf}``; lists of scalars become one comma-joined cell."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list):
        return {prefix: ",".join(str(v) for v in value)}
    return {prefix: value}


def find_jobs(root: Path) -> list[Path]:
    """Job folders under ``root`` (itself included), in natural order (job 2 before job 10)."""
    marks = [p.parent.parent for p in root.rglob(".hydra/overrides.yaml")]
    marks += [p.parent for name in RESULT_FILES for p in root.rglob(name)]
    jobs = sorted(set(marks), key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts])
    # A results file inside a job's subfolders (an eval out_dir, say) belongs to that job, not to a job of its own.
    return [j for j in jobs if not any(o != j and o in j.parents and (o / ".hydra").is_dir() for o in jobs)]


def _report(job: Path) -> dict[str, Any] | None:
    reports = sorted(job.rglob("report.json"))
    return json.loads(reports[0].read_text()) if reports else None


def overrides_of(job: Path) -> dict[str, str]:
    """A training job's ``.hydra/overrides.yaml``, else the ``overrides`` an ``unclip-eval`` report records."""
    path = job / ".hydra" / "overrides.yaml"
    if path.is_file():
        items = yaml.safe_load(path.read_text()) or []
    else:
        items = (_report(job) or {}).get("overrides") or []
    return dict(item.split("=", 1) if "=" in item else (item, "") for item in items)


def results_of(job: Path) -> dict[str, Any]:
    """metrics.json as written plus report.json (anywhere under the job) flattened under ``report.``."""
    row: dict[str, Any] = {}
    if (job / "metrics.json").is_file():
        row.update(flatten(json.loads((job / "metrics.json").read_text()), ""))
    report = _report(job)
    if report is not None:
        row.update(flatten({k: v for k, v in report.items() if k != "overrides"}, "report"))
    return row


def collect(root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of every job under ``root``.

    :raises FileNotFoundError: when ``root`` holds no job.
    """
    jobs = find_jobs(root)
    if not jobs:
        raise FileNotFoundError(f"no jobs under {root}: no .hydra/overrides.yaml, metrics.json or report.json")
    rows, override_keys, metric_keys = [], [], []
    for job in jobs:
        overrides, results = overrides_of(job), results_of(job)
        override_keys += [k for k in overrides if k not in override_keys]
        metric_keys += [k for k in results if k not in metric_keys and k not in overrides]
        rows.append({"job": str(job.relative_to(root)) or ".", "status": "ok" if results else "no results",
                     **overrides, **results})
    varying = [k for k in override_keys if len({str(r.get(k, "")) for r in rows}) > 1]
    fixed = [k for k in override_keys if k not in varying]
    return ["job", "status", *varying, *fixed, *sorted(metric_keys)], rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: _cell(r.get(c)) for c in columns} for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (hydra.sweep.dir) or any folder of runs")
    parser.add_argument("--csv", type=Path, default=None, help="write the table as CSV here")
    parser.add_argument("--md", type=Path, default=None, help="write the markdown table here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        columns, rows = collect(args.sweep_dir)
    except FileNotFoundError as exc:
        print(f"collect_runs: {exc}", file=sys.stderr)
        return 1
    if args.csv is not None:
        write_csv(args.csv, columns, rows)
    table = to_markdown(columns, rows)
    if args.md is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
