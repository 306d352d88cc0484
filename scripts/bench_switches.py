"""The decoder training step with each efficiency switch on and off, in one run: ``step_switches``.

    python scripts/bench.py --only step_switches --out switches.json     # on a quiet machine

The network is the emoji tiny decoder (``conf/model/decoder/tiny.yaml``, caption encoder on, 32px) with the
emoji preset's diffusion (v prediction, learned variance, hybrid loss) at batch 32; each variant is one change
from the baseline (the per-tensor AdamW loop, channels-first, dropout 0.1, eager, glibc's default allocator), plus
all cheap switches together, and runs in a fresh spawned process (``malloc_kept`` sets glibc's environment there,
which glibc reads at process start). Rows: median and min step seconds, the first step (for ``compile``: the
compile warm-up), achieved GFLOP/s (3x the counted forward FLOPs x batch) and the speed-up over the baseline.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import count_flops, isolated, matmul_ceiling_rows, row, suite_main  # noqa: E402

from unclip.diffusion import create_diffusion  # noqa: E402
from unclip.models.unet import DecoderUNet, build_unet  # noqa: E402

TINY = ROOT / "conf" / "model" / "decoder" / "tiny.yaml"
DIFFUSION = dict(steps=1000, noise_schedule="cosine", mean_type="v", var_type="learned_range", loss_type="hybrid",
                 snr_gamma=None, vlb_weight=0.001)
# the environment equivalent of unclip.runtime.keep_malloc_arenas (what the runner sets through mallopt)
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**30)}
BASELINE: dict[str, Any] = {"optimizer": "single", "channels_last": False, "dropout": 0.1, "compile": False,
                            "malloc_kept": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "adamw_foreach": {"optimizer": "foreach"},
    "adamw_fused": {"optimizer": "fused"},
    "channels_last": {"channels_last": True},
    "dropout0": {"dropout": 0.0},
    "malloc_kept": {"malloc_kept": True},
    "compile": {"compile": True},
    "cheap_switches_together": {"optimizer": "fused", "channels_last": True, "dropout": 0.0, "malloc_kept": True},
}


def optimizer_kwargs(name: str) -> dict[str, bool]:
    """AdamW's implementation switch: the per-tensor loop, foreach (multi-tensor) or fused."""
    return {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[name]


def time_step(switches: dict[str, Any], batch: int, repeats: int) -> dict[str, Any]:
    """Seconds of the first and of ``repeats`` further training steps with ``switches``, and the forward FLOPs."""
    config = {**OmegaConf.to_container(OmegaConf.load(TINY)), "dropout": switches["dropout"]}  # type: ignore[dict-item]
    torch.manual_seed(0)
    net = build_unet(DecoderUNet, config, out_channels=6)
    if switches["channels_last"]:
        net.to(memory_format=torch.channels_last)
    text = config["text"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    cond = {"image_embed": F.normalize(torch.randn(batch, config["clip_embed_dim"], generator=g), dim=-1),
            "text_tokens": torch.randn(batch, text["context_length"], text["input_width"], generator=g),
            "text_mask": torch.ones(batch, text["context_length"], dtype=torch.bool)}
    with torch.no_grad():
        flops = count_flops(lambda: net(x0[:1], torch.zeros(1, dtype=torch.long),
                                        **{k: v[:1] for k, v in cond.items()}))
    model = torch.compile(net) if switches["compile"] else net
    process = create_diffusion(**DIFFUSION)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, **optimizer_kwargs(switches["optimizer"]))
    net.train()

    def step() -> float:
        start = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), generator=g)
        extra = {**cond, **net.drop_masks(batch, "cpu", g)}
        process.training_losses(model, x0, t, extra)["loss"].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = step()
    times = [step() for _ in range(repeats)]
    return {"first": first, "times": times, "fwd_flops": flops,
            "malloc_env": all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())}


def variant_in_process(switches: dict[str, Any], batch: int, repeats: int) -> dict[str, Any]:
    """:func:`time_step` in a fresh spawned process, with glibc's allocator environment when asked."""
    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    if switches["malloc_kept"]:
        os.environ.update(MALLOC_ENV)
    try:
        return isolated(time_step, switches, batch, repeats)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def variant_rows(name: str, result: dict[str, Any], batch: int, baseline_s: float | None) -> list[dict]:
    w = f"step_switches/decoder_tiny_32px_b{batch}/{name}"
    median = statistics.median(result["times"])
    step_gflop = 3 * result["fwd_flops"] * batch / 1e9
    rows = [row(w, "step_s", round(median, 4), "s"), row(w, "step_s_min", round(min(result["times"]), 4), "s"),
            row(w, "first_step_s", round(result["first"], 3), "s (compile warm-up included)"),
            row(w, "achieved_gflop_s", round(step_gflop / median, 1), "GFLOP/s (3x fwd x batch)"),
            row(w, "malloc_env_seen", result["malloc_env"], "bool")]
    if baseline_s is not None:
        rows.append(row(w, "speedup_vs_baseline", round(baseline_s / median, 3), "x"))
    return rows


def run(quick: bool = False) -> list[dict]:
    batch, repeats = (4, 2) if quick else (32, 8)
    rows = matmul_ceiling_rows(seconds=0.5 if quick else 3.0)
    baseline_s = None
    for name, change in VARIANTS.items():
        result = variant_in_process({**BASELINE, **change}, batch, repeats)
        rows += variant_rows(name, result, batch, baseline_s)
        if name == "baseline":
            baseline_s = statistics.median(result["times"])
    return rows


if __name__ == "__main__":
    sys.exit(suite_main(run, __doc__))
