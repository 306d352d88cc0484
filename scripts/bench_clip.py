"""Benchmark CLIP training steps: samples/s and peak memory for the tiny presets and a ViT-B/32.

    python scripts/bench_clip.py [--quick]

Prints a JSON list of ``{"workload", "metric", "value", "unit"}``. Synthetic inputs (random pixels and
token ids), so the numbers measure the model, loss and optimiser step, not the data pipeline. Each preset runs
in a fresh spawned process, so its peak memory (``torch.cuda.max_memory_allocated`` on a GPU, the process's peak
RSS on a CPU) is its own.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import device as _device  # noqa: E402
from bench_common import isolated, peak_memory_mib, peak_unit, reset_peak_memory, suite_main  # noqa: E402

from unclip.models.clip import build_clip, make_loss  # noqa: E402
from unclip.models.hard_negative_loss import HardNegativeClipLoss  # noqa: E402
from unclip.training.optim import build_optimizer  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf" / "model" / "clip"
NO_DECAY = ("positional_embedding", "class_embedding", "logit_scale", "logit_bias")


def bench_preset(preset: str, batch_size: int, steps: int, warmup: int, context_length: int | None = None,
                 hard_negatives: int = 0) -> list[dict]:
    """Time ``steps`` AdamW training steps of ``conf/model/clip/<preset>.yaml`` after ``warmup`` untimed ones.

    :param context_length: override the preset's text context (the demo runs the tiny ResNet at 16).
    :param hard_negatives: K hard-negative captions per sample (``data.hard_negatives``): K x batch more captions
        through the text tower, scored by ``HardNegativeClipLoss``.
    :return: rows for samples/s and peak memory.
    """
    device = _device()
    cfg = yaml.safe_load((CONF / f"{preset}.yaml").read_text())
    if context_length is not None:
        cfg["text"]["context_length"] = context_length
    model, oc_cfg = build_clip(cfg)
    model.to(device).train()
    optimizer = build_optimizer(lambda groups: torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.1), model, NO_DECAY)
    loss_fn = make_loss("clip", local_loss=False, gather_with_grad=False, rank=0, world_size=1)
    size = oc_cfg["vision_cfg"]["image_size"]
    ctx = oc_cfg["text_cfg"]["context_length"]
    images = torch.randn(batch_size, 3, size, size, device=device)
    tokens = torch.randint(1, 49407, (batch_size * (1 + hard_negatives), ctx), device=device)
    mask = torch.ones(batch_size, hard_negatives, dtype=torch.bool, device=device)
    negative_loss = HardNegativeClipLoss()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            image_f, text_f, scale = model(images, tokens)[:3]
            if hard_negatives:  # captions and their negatives in one text-tower batch, as CLIPModule does
                loss = negative_loss(image_f, text_f[:batch_size], scale,
                                     text_f[batch_size:].view(batch_size, hard_negatives, -1), mask)
            else:
                loss = loss_fn(image_f, text_f, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    variant = (f"/ctx{ctx}" if context_length is not None else "") + (f"/neg{hard_negatives}" if hard_negatives else "")
    workload = f"clip_train_step/{preset}/b{batch_size}/{size}px{variant}/{device.type}"
    return [{"workload": workload, "metric": "samples_per_s", "value": batch_size * steps / seconds,
             "unit": "samples/s"},
            {"workload": workload, "metric": "peak_memory", "value": round(peak_memory_mib(device), 1),
             "unit": peak_unit(device)}]


def run(quick: bool) -> list[dict]:
    """Benchmark the tiny presets (the demo's tiny ResNet with and without its 3 hard negatives) and ViT-B/32.

    :param quick: fewer timed steps (a smoke run of the benchmark itself).
    """
    gpu = _device().type == "cuda"
    steps = 3 if quick else 10
    batch = 256 if gpu else 64
    rows = isolated(bench_preset, "tiny", batch, steps, 2)
    rows += isolated(bench_preset, "tiny_resnet", batch, steps, 2, 16)
    rows += isolated(bench_preset, "tiny_resnet", batch, steps, 2, 16, 3)
    rows += isolated(bench_preset, "vit_b32", 128 if gpu else 8, max(2, steps // 2), 1)
    return rows


def main(argv: list[str] | None = None) -> int:
    return suite_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
