"""Training compute of a paper-scale unCLIP run, per stage, measured with torch.utils.flop_counter.

    python scripts/flops.py [--mfu 0.4] [--peak-tflops 989] [--json out.json]

For each Table 3 preset (conf/experiment/paper_*.yaml) it builds the network from the composed config and counts
the FLOPs of one training forward + backward of ONE sample (matmuls, convolutions and attention, as FlopCounterMode
counts them; elementwise ops are not counted):

* decoder and upsamplers: on the meta device (no weights allocated), at the training resolution (the upsamplers
  train on random crops: crop_fraction x output side);
* prior: its caption-length cut and query-row shortcut need real tensors, so it runs on the CPU at full width with
  1 and 2 blocks; the 24-block count is f(1) + 23 (f(2) - f(1)) (blocks are identical), at a full 77-token caption.

Then: samples = batch x iterations (Table 3), total = FLOPs/sample x samples, GPU hours = total / (peak x MFU).
Activation checkpointing recomputes the forward (about +1/3 hardware FLOPs): the model FLOPs here exclude it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unclip.config import register_resolvers  # noqa: E402
from unclip.models.prior import PriorTransformer  # noqa: E402

# stage, experiment, Table 3 batch and iterations
RUNS = [("prior", "paper_prior", 4096, 600_000), ("decoder", "paper_decoder", 2048, 800_000),
        ("upsampler", "paper_upsampler_256", 1024, 1_000_000), ("upsampler", "paper_upsampler_1024", 512, 1_000_000)]
CLIP_TOKENS = 77  # the paper CLIP's caption context (ViT-H/16 text tower)


def compose_experiment(experiment: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={experiment}", "data=emoji", "run_dir=null",
                                                       "clip_ckpt=null"])


def count(fn) -> int:
    """FLOPs of ``fn()`` (forward and backward inside it)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def prior_flops(cfg) -> tuple[int, int]:
    """(training FLOPs per sample, parameters) of the paper prior, by the 1- and 2-block difference."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    d, w_t = model_cfg["embed_dim"], model_cfg["text_width"]

    def one(depth: int) -> int:
        torch.manual_seed(0)
        net = PriorTransformer.from_config({**model_cfg, "depth": depth})
        x, z_t = torch.randn(1, d), torch.nn.functional.normalize(torch.randn(1, d), dim=-1)
        tokens, mask = torch.randn(1, CLIP_TOKENS, w_t), torch.ones(1, CLIP_TOKENS, dtype=torch.bool)
        return count(lambda: net(x, torch.tensor([500]), z_t, tokens, mask).square().sum().backward())

    f1, f2 = one(1), one(2)
    depth = model_cfg["depth"]
    with torch.device("meta"):
        params = sum(p.numel() for p in PriorTransformer.from_config(model_cfg).parameters())
    return f1 + (depth - 1) * (f2 - f1), params


def unet_flops(cfg, stage: str) -> tuple[int, int, int]:
    """(training FLOPs per sample, parameters, training side) of a paper decoder/upsampler, on the meta device."""
    with torch.device("meta"):
        module = instantiate(cfg.module, _recursive_=False)
    net = module.net
    params = sum(p.numel() for p in net.parameters())
    side = int(cfg.model.image_size)
    if stage == "upsampler":
        side = int(round(side * float(cfg.module.crop_fraction)))
    kw = {"device": "meta"}
    x, t = torch.randn(1, 3, side, side, **kw), torch.zeros(1, dtype=torch.long, **kw)
    if stage == "decoder":
        text = cfg.model.text
        extra = {"image_embed": torch.randn(1, int(cfg.model.clip_embed_dim), **kw)}
        if text is not None:
            extra["text_tokens"] = torch.randn(1, int(text.context_length), int(text.input_width), **kw)
            extra["text_mask"] = torch.ones(1, int(text.context_length), dtype=torch.bool, **kw)
    else:
        low = int(cfg.module.input_size) * side // int(cfg.model.image_size)
        extra = {"low_res": torch.randn(1, 3, low, low, **kw)}
        if cfg.model.get("noise_aug"):
            extra["aug_level"] = torch.zeros(1, **kw)
    return count(lambda: net(x, t, **extra).sum().backward()), params, side


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak, dense bf16 (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rate = args.peak_tflops * 1e12 * args.mfu  # FLOP/s per GPU
    rows = []
    for stage, experiment, batch, iters in RUNS:
        cfg = compose_experiment(experiment)
        if stage == "prior":
            per_sample, params = prior_flops(cfg)
            side = None
        else:
            per_sample, params, side = unet_flops(cfg, stage)
        samples = batch * iters
        total = per_sample * samples
        rows.append({"experiment": experiment, "params": params, "train_side": side,
                     "flops_per_sample": per_sample, "batch": batch, "iterations": iters, "samples": samples,
                     "total_flops": total, "gpu_hours": total / rate / 3600})
    print(f"| preset | params | train res | GFLOPs/sample (fwd+bwd) | samples | total FLOPs | GPU-hours at "
          f"{args.peak_tflops:g} TFLOP/s x {args.mfu:g} MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        side = f"{r['train_side']}px" if r["train_side"] else "77 tokens"
        print(f"| {r['experiment']} | {r['params'] / 1e9:.2f}B | {side} | {r['flops_per_sample'] / 1e9:,.1f} | "
              f"{r['samples'] / 1e9:.2f}B | {r['total_flops']:.2e} | {r['gpu_hours']:,.0f} |")
    total = sum(r["gpu_hours"] for r in rows)
    print(f"| all four | | | | | {sum(r['total_flops'] for r in rows):.2e} | {total:,.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
