"""Benchmark the diffusion prior: training step, sampling, and unclip-embed throughput.

    python scripts/bench_prior.py [--quick]

Prints a JSON list of ``{"workload", "metric", "value", "unit"}``. The training step is forward + backward +
AdamW step of a ~7.5M-parameter prior (width 256, 9 blocks, D = 256, text width 256, context 77) at batch 64
on synthetic inputs. Two caption workloads:

* ``captions``: real captions of 5-24 tokens padded to 77 (as CLIP tokenises them); our prior cuts the batch to
  its longest real caption;
* ``dense77``: all 77 tokens real (worst case: 81 sequence positions).

DALLE2-pytorch's DiffusionPrior is timed beside ours, at equal positions, by scripts/bench_compare_ref.py
(``scripts/bench.py --compare-ref``), never typed in here.

Each training-step workload runs in a fresh spawned process, so its peak memory (the process's peak RSS on a CPU,
``max_memory_allocated`` on a GPU) is its own; scripts/bench.py adds the suite process's peak RSS.
Run with nothing else on the machine: on 2 cores a second busy process slows small torch ops many times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import isolated, peak_memory_mib, peak_unit, reset_peak_memory, timed  # noqa: E402

from unclip.diffusion import create_diffusion  # noqa: E402
from unclip.models.prior import PriorTransformer  # noqa: E402
from unclip.models.prior_sampling import sample_prior  # noqa: E402
from unclip.training.optim import build_optimizer  # noqa: E402

BENCH_MODEL = dict(embed_dim=256, text_width=256, context_length=77, width=256, depth=9, heads=4, mlp_ratio=4.0,
                   embed_scale=17.2)
BATCH, CTX = 64, 77
NO_DECAY = ("pos_embed", "query", "null_text")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conditioning(batch: int, lengths: tuple[int, int], device: torch.device, seed: int = 0) -> dict:
    """Synthetic prior conditioning: unit-norm z_t, token encodings and a padding mask of real lengths in
    ``lengths`` (inclusive) out of CTX positions."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=g)
    return {"text_embed": F.normalize(torch.randn(batch, BENCH_MODEL["embed_dim"], generator=g), dim=-1).to(device),
            "text_tokens": torch.randn(batch, CTX, BENCH_MODEL["text_width"], generator=g).to(device),
            "text_mask": (torch.arange(CTX)[None] < n[:, None]).to(device)}


def bench_train_step(name: str, lengths: tuple[int, int], steps: int, bf16: bool = False) -> list[dict]:
    """Median seconds per training step (forward, backward, AdamW step) after 2 untimed steps."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reset_peak_memory(device)
    torch.manual_seed(0)
    model = PriorTransformer(**BENCH_MODEL).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(lambda groups: torch.optim.AdamW(groups, lr=1.1e-4, betas=(0.9, 0.96), eps=1e-6,
                                                                 weight_decay=6e-2), model, NO_DECAY)
    process = create_diffusion(steps=1000, noise_schedule="cosine", mean_type="x0", loss_type="mse")
    cond = conditioning(BATCH, lengths, device)
    x0 = model.scale(F.normalize(torch.randn(BATCH, BENCH_MODEL["embed_dim"]), dim=-1)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        t = torch.randint(0, 1000, (BATCH,), device=device)
        extra = {**cond, "cond_drop_mask": torch.rand(BATCH, device=device) < 0.1}
        with autocast:
            loss = process.training_losses(model, x0, t, extra)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed(step, steps, device, warmup=2)
    per_step = statistics.median(times)
    workload = f"prior_train_step/{name}" + ("/bf16" if bf16 else "")
    return [{"workload": workload, "metric": "params", "value": params, "unit": "count"},
            {"workload": workload, "metric": "s_per_step", "value": round(per_step, 4), "unit": "s"},
            {"workload": workload, "metric": "s_per_step_min", "value": round(min(times), 4), "unit": "s"},
            {"workload": workload, "metric": "samples_per_s", "value": round(BATCH / per_step, 1), "unit": "samples/s"},
            {"workload": workload, "metric": "peak_memory", "value": round(peak_memory_mib(device), 1),
             "unit": peak_unit(device)}]


class Uncached:
    """The network without ``with_cached_prefix``: sample_prior then runs the whole sequence at every step."""

    def __init__(self, model: PriorTransformer):
        self.model, self.embed_dim = model, model.embed_dim

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.unscale(x)


def bench_sampling(repeats: int, device: torch.device) -> list[dict]:
    """Seconds to sample z_i for 64 captions: 64 DDIM steps, 2 candidates, with and without guidance, and with the
    caption prefix recomputed every step (no cache) for comparison."""
    torch.manual_seed(0)
    model = PriorTransformer(**BENCH_MODEL).to(device).eval()
    process = create_diffusion(steps=1000, noise_schedule="cosine", mean_type="x0", loss_type="mse")
    cond = conditioning(BATCH, (5, 24), device)
    rows = []
    for name, scale, cached in (("guidance1", 1.0, True), ("guidance3", 3.0, True), ("guidance1_nocache", 1.0, False)):
        net = model if cached else Uncached(model)
        times = []
        for r in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            sample_prior(net, cond, process, sampler="ddim", steps=64, guidance_scale=scale, candidates=2,
                         generator=torch.Generator(device).manual_seed(r))
            _sync(device)
            times.append(time.perf_counter() - start)
        per_batch = statistics.median(times[1:])
        workload = f"prior_sample/ddim64_cand2_{name}"
        rows += [{"workload": workload, "metric": "s_per_64_captions", "value": round(per_batch, 3), "unit": "s"},
                 {"workload": workload, "metric": "captions_per_s", "value": round(BATCH / per_batch, 1),
                  "unit": "captions/s"}]
    return rows


def bench_embed(device: torch.device) -> list[dict]:
    """unclip-embed images/s with a random-weights tiny CLIP (conf/model/clip/tiny.yaml) on the emoji val shard
    (400 images at 128px), or on generated shards when the emoji data is absent."""
    import yaml

    from unclip.embed import run_embed
    from unclip.models.clip import build_clip, clip_metadata, export_open_clip

    emoji = ROOT.parent / "shared" / "data" / "emoji" / "val" / "00000.tar"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = yaml.safe_load((ROOT / "conf" / "model" / "clip" / "tiny.yaml").read_text())
        clip, oc_cfg = build_clip(cfg)
        export_open_clip(clip, clip_metadata(clip, cfg, oc_cfg), Path(tmp) / "clip")
        if emoji.is_file():
            shards, source = [str(emoji)], "emoji_val"
        else:
            sys.path.insert(0, str(ROOT))
            from tests.data.shard_helpers import write_clean_shards

            shards = write_clean_shards(Path(tmp) / "shards", n_shards=2, per_shard=200, size=(128, 128))
            source = "synthetic"
        summary = run_embed(str(Path(tmp) / "clip"), shards, str(Path(tmp) / "emb"), batch_size=256, num_workers=1,
                            rank=0, world_size=1, device=device.type, progress=False)
    return [{"workload": f"unclip_embed/tiny_clip_{source}", "metric": "images_per_s", "value": summary["images_per_s"],
             "unit": "images/s"}]


def run(quick: bool = False) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = 3 if quick else 8
    rows = isolated(bench_train_step, "captions", (5, 24), steps)
    rows += isolated(bench_train_step, "dense77", (CTX, CTX), steps)
    rows += isolated(bench_train_step, "dense77", (CTX, CTX), steps, True)
    rows += bench_sampling(1 if quick else 3, device)
    rows += bench_embed(device)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    args = parser.parse_args(argv)
    print(json.dumps(run(quick=args.quick), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
