"""Upsampler benchmark: the training step and one sampling pass of the emoji upsampler preset.

The network and module are ``experiment=emoji_upsampler_tiny`` (conf/model/upsampler/tiny.yaml: 32 → 64px,
no attention), built from the composed config as ``unclip-train`` builds it, with random weights.

* ``upsampler_train_step/emoji_tiny/b16``: one optimiser step (forward, backward, AdamW) as
  ``UpsamplerModule.training_step`` computes it: 64px targets from synthetic images, the 32px low-res input
  (downsampled, noise-augmented, upsampled back), 32px paired crops (``crop_fraction`` 0.5), hybrid loss.
  Median seconds per step and samples/s; forward + backward + step only, no logging.
* ``upsampler_sample/emoji_tiny/b8``: 8 images 32 → 64px through ``sample_upsampler`` with the preset's own
  sampling config; median wall seconds (after a warm-up call, except in quick mode).

    python scripts/bench_upsampler.py [--quick]      # prints a JSON list of {"workload", "metric", "value", "unit"}

``run(quick)`` is called by scripts/bench.py in a process of its own (its peak RSS row is added there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import device as _device  # noqa: E402
from bench_common import stage_module, sync, timed  # noqa: E402

PRESET = ["stage=upsampler", "experiment=emoji_upsampler_tiny"]
BATCH = 16


def bench_train(repeats: int) -> list[dict]:
    """Median AdamW step of the emoji upsampler's hybrid loss at batch 16 (64px targets, 32px crops)."""
    device = _device()
    torch.manual_seed(0)
    module = stage_module(PRESET)
    module.setup("fit")
    module.to(device).train()
    size = int(module.model_config["image_size"])
    images = torch.rand(BATCH, 3, size, size, device=device) * 2 - 1
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-3)

    def step() -> None:
        x0, kwargs = module.training_inputs({"image": images})
        t = torch.randint(0, module.process.num_timesteps, (x0.shape[0],), device=device)
        module.process.training_losses(module.net, x0, t, kwargs)["loss"].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    per_step = statistics.median(timed(step, repeats, device))
    params = sum(p.numel() for p in module.net.parameters())
    w = f"upsampler_train_step/emoji_tiny/b{BATCH}/{module.crop_size}px_crops/{device.type}"
    return [{"workload": w, "metric": "s_per_step", "value": round(per_step, 4), "unit": "s"},
            {"workload": w, "metric": "samples_per_s", "value": round(BATCH / per_step, 1), "unit": "samples/s"},
            {"workload": w, "metric": "params", "value": round(params / 1e6, 2), "unit": "M"}]


def bench_sample(repeats: int, warmup: bool) -> list[dict]:
    """8 images upsampled by the preset's sampling config (sampler and steps as its checkpoint would carry)."""
    from unclip.decoder_sampling import sample_upsampler

    device = _device()
    torch.manual_seed(0)
    module = stage_module(PRESET)
    module.setup("fit")
    module.to(device).eval()
    meta = module.stage_info()
    low = torch.rand(8, 3, module.input_size, module.input_size, device=device) * 2 - 1
    times = []
    for r in range(repeats + int(warmup)):
        sync(device)
        start = time.perf_counter()
        sample_upsampler(module.net, meta, low, generator=torch.Generator(device).manual_seed(r))
        sync(device)
        times.append(time.perf_counter() - start)
    sampling = meta.sampling
    w = (f"upsampler_sample/emoji_tiny/b8/{module.input_size}to{meta.image_size}px/"
         f"{sampling['sampler']}{sampling['steps']}/{device.type}")
    seconds = statistics.median(times[int(warmup):])
    return [{"workload": w, "metric": "seconds", "value": round(seconds, 3), "unit": "s"}]


def run(quick: bool = False) -> list[dict]:
    return bench_train(2 if quick else 5) + bench_sample(1 if quick else 3, warmup=not quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    print(json.dumps(run(parser.parse_args(argv).quick), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
