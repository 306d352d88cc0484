"""Benchmark CLIP training steps: samples/s and peak memory for the tiny preset and a ViT-B/32.

    python scripts/bench_clip.py [--quick]

Prints a JSON list of ``{"workload", "metric", "value", "unit"}``. Synthetic inputs (random pixels and
token ids), so the numbers measure the model, loss and optimiser step, not the data pipeline. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU (which includes everything
the process allocated before, e.g. the previous workload).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

from unclip.models.clip import build_clip, make_loss
from unclip.training.optim import build_optimizer

CONF = Path(__file__).resolve().parent.parent / "conf" / "model" / "clip"
NO_DECAY = ("positional_embedding", "class_embedding", "logit_scale", "logit_bias")


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_preset(preset: str, batch_size: int, steps: int, warmup: int, device: torch.device) -> list[dict]:
    """Time ``steps`` AdamW training steps of ``conf/model/clip/<preset>.yaml`` after ``warmup`` untimed ones.

    :return: rows for samples/s and peak memory.
    """
    cfg = yaml.safe_load((CONF / f"{preset}.yaml").read_text())
    model, oc_cfg = build_clip(cfg)
    model.to(device).train()
    optimizer = build_optimizer(lambda groups: torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.1), model, NO_DECAY)
    loss_fn = make_loss("clip", local_loss=False, gather_with_grad=False, rank=0, world_size=1)
    size = oc_cfg["vision_cfg"]["image_size"]
    ctx = oc_cfg["text_cfg"]["context_length"]
    images = torch.randn(batch_size, 3, size, size, device=device)
    tokens = torch.randint(1, 49407, (batch_size, ctx), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = loss_fn(*model(images, tokens))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    workload = f"clip_train_step/{preset}/b{batch_size}/{size}px/{device.type}"
    return [{"workload": workload, "metric": "samples_per_s", "value": batch_size * steps / seconds, "unit": "samples/s"},
            {"workload": workload, "metric": "peak_memory", "value": _peak_memory_mib(device),
             "unit": "MiB (GPU allocated)" if device.type == "cuda" else "MiB (peak RSS)"}]


def run(quick: bool) -> list[dict]:
    """Benchmark the tiny preset and ViT-B/32 (small batch on a CPU).

    :param quick: fewer timed steps (a smoke run of the benchmark itself).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    steps = 3 if quick else 10
    rows = bench_preset("tiny", batch_size=256 if gpu else 64, steps=steps, warmup=2, device=device)
    rows += bench_preset("vit_b32", batch_size=128 if gpu else 8, steps=max(2, steps // 2), warmup=1, device=device)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
