"""Helpers shared by the benchmark suites (scripts/bench_*.py): peak memory and per-workload processes.

Every suite runs in a process of its own under scripts/bench.py, which adds the suite's peak RSS. A suite whose
workloads differ a lot in memory runs each in a fresh spawned process (:func:`isolated`) and reports
:func:`peak_memory_mib` from inside it, so each peak is that workload's own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], repeats: int, dev: torch.device, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (allocator, optimiser state,
    oneDNN primitives), synchronising the GPU around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        start = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - start)
    return times


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` as torch's FLOP counter sees them (matmuls, convolutions, attention; not elementwise)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def cpu_bf16() -> bool:
    """Whether this CPU has native bf16 matmuls (oneDNN's check: AVX512-BF16 / AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Sustained GFLOP/s of ``torch.mm`` on ``n`` x ``n`` matrices (2n³ FLOPs each) for about ``seconds``, at this
    process's torch thread count: the ceiling a network's achieved GFLOP/s is read against."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up: oneDNN/BLAS kernel choice, thread pool start
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
        torch.mm(a, b)
        calls += 1
    return 2 * n**3 * calls / elapsed / 1e9


def matmul_ceiling_rows(seconds: float = 1.0) -> list[dict]:
    """``machine/matmul_ceiling`` rows: fp32 GFLOP/s, and bf16 where the CPU has native bf16."""
    workload = f"machine/matmul_ceiling/{torch.get_num_threads()}threads"
    rows = [{"workload": workload, "metric": "fp32_gflop_s", "value": round(matmul_gflops(torch.float32,
                                                                                          seconds=seconds), 1),
             "unit": "GFLOP/s"}]
    if cpu_bf16():
        rows.append({"workload": workload, "metric": "bf16_gflop_s",
                     "value": round(matmul_gflops(torch.bfloat16, seconds=seconds), 1), "unit": "GFLOP/s"})
    return rows


def row(workload: str, metric: str, value: Any, unit: str) -> dict:
    return {"workload": workload, "metric": metric, "value": value, "unit": unit}


def step_rows(workload: str, params: int, fwd_flops_per_item: float, batch: int, times: list[float],
              extra: dict[str, Any] | None = None) -> list[dict]:
    """The rows of one timed training step: parameters, forward GFLOP per item, step GFLOP (3x forward x batch),
    median seconds and achieved GFLOP/s."""
    step_gflop = 3 * fwd_flops_per_item * batch / 1e9
    median = statistics.median(times)
    rows = [row(workload, "params", params, "count"),
            row(workload, "fwd_gflop_per_item", round(fwd_flops_per_item / 1e9, 4), "GFLOP"),
            row(workload, "step_gflop", round(step_gflop, 2), "GFLOP (3x fwd x batch)"),
            row(workload, "batch", batch, "items"),
            row(workload, "step_s", round(median, 4), "s"),
            row(workload, "step_s_min", round(min(times), 4), "s"),
            row(workload, "achieved_gflop_s", round(step_gflop / median, 1), "GFLOP/s")]
    return rows + [row(workload, k, v, "") for k, v in (extra or {}).items()]


def closest(candidates: dict[Any, float], target: float) -> tuple[Any, float]:
    """The candidate whose value is nearest ``target`` and its relative gap (value / target - 1)."""
    key = min(candidates, key=lambda k: abs(candidates[k] - target))
    return key, candidates[key] / target - 1


def step_intervals(stamps: list[float], warmup: int) -> list[float]:
    """Seconds between consecutive step-end clock readings, the first ``warmup`` steps (and start-up) dropped."""
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:], strict=False)]


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(dev: torch.device) -> None:
    """Start a workload's GPU peak afresh (a CPU process's peak RSS cannot be reset: use :func:`isolated`)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_mib(dev: torch.device) -> float:
    """The CUDA allocator's peak since :func:`reset_peak_memory` on a GPU, else this process's peak RSS."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return peak_rss_mib()


def peak_unit(dev: torch.device) -> str:
    return "MiB (GPU allocated)" if dev.type == "cuda" else "MiB (peak RSS)"


def _run_and_send(queue: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001  (re-raised in the parent with the child's traceback)
        import traceback

        queue.put(("error", traceback.format_exc()))


def isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a fresh spawned process and return its result, so peaks never mix between workloads.

    ``fn`` must be a module-level function of an importable module (the suites' folder is on ``sys.path``). The
    process is not a daemon (unlike a Pool's workers), so the workload may start data-loader workers of its own.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_run_and_send, args=(queue, fn, args))
    process.start()
    status, value = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__} failed in its own process:\n{value}")
    return value


def compose_train(overrides: list[str]):
    """conf/train.yaml composed with ``overrides`` (no run folder, no data workers), resolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from unclip.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["run_dir=null", "data.num_workers=0", *overrides])
    OmegaConf.resolve(cfg)
    return cfg


def stage_module(overrides: list[str]):
    """A stage LightningModule from conf/train.yaml composed with ``overrides``, as ``unclip-train`` builds it
    (untrained: call ``setup("fit")`` and, for the prior, ``configure_model()`` before use)."""
    from hydra.utils import instantiate

    return instantiate(compose_train(overrides).module, _recursive_=False)


def save_stage(module, path: Path) -> Path:
    """Write ``module`` (random weights) as a loadable stage checkpoint without training, as Lightning would hold
    it: ``state_dict`` (network + EMA) and ``checkpoint["unclip"]`` metadata (see tests/tiny_chain.py)."""
    from unclip.checkpoints import CHECKPOINT_KEY

    module.setup("fit")
    if hasattr(module, "configure_model"):
        module.configure_model()  # the prior builds its EMA there
    torch.save({"state_dict": module.state_dict(),
                CHECKPOINT_KEY: {"stage": module.stage, **module.checkpoint_metadata()}}, path)
    return path


def suite_main(run: Callable[[bool], list[dict]], description: str, argv: list[str] | None = None) -> int:
    """A suite's command line: ``python scripts/bench_<suite>.py [--quick]`` prints ``run(quick)``'s rows as JSON."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (noisier)")
    print(json.dumps(run(parser.parse_args(argv).quick), indent=1))
    return 0
