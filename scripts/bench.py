"""unclip's benchmark suite: run every workload, write JSON, compare against an earlier run.

    python scripts/bench.py --out bench.json                 # all workloads
    python scripts/bench.py --only data diffusion --quick    # a subset, fewer repeats
    python scripts/bench.py --compare old.json --out new.json  # ratios new/old per workload

Run it with nothing else on the machine: on 2 cores a second busy process slows torch ops ~100x.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = {"data": "bench_data", "diffusion": "bench_diffusion", "clip": "bench_clip", "prior": "bench_prior",
          "decoder": "bench_decoder"}


def machine() -> dict:
    import torch

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def run_suites(names: list[str], quick: bool) -> list[dict]:
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT))
    rows = []
    for name in names:
        module = importlib.import_module(SUITES[name])
        print(f"# {name} ...", file=sys.stderr, flush=True)
        rows += module.run(quick=quick)
    return rows


def compare(new: list[dict], old: list[dict]) -> list[dict]:
    """Ratio new/old for each (workload, metric) present in both."""
    before = {(r["workload"], r["metric"]): r["value"] for r in old}
    out = []
    for r in new:
        prev = before.get((r["workload"], r["metric"]))
        if isinstance(prev, (int, float)) and prev and isinstance(r["value"], (int, float)):
            out.append({"workload": r["workload"], "metric": r["metric"], "old": prev, "new": r["value"],
                        "ratio": round(r["value"] / prev, 3)})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| workload | metric | value | unit |", "|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['metric']} | {r['value']} | {r.get('unit', '')} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(SUITES), default=sorted(SUITES))
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--compare", type=Path, help="an earlier results JSON: print ratios new/old")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    rows = run_suites(args.only, args.quick)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "results": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.compare:
        report["comparison"] = compare(rows, json.loads(args.compare.read_text())["results"])
        for r in report["comparison"]:
            print(f"{r['workload']:45s} {r['metric']:22s} {r['old']:>12} -> {r['new']:>12}  x{r['ratio']}")
    print(markdown(rows) if args.markdown else json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
