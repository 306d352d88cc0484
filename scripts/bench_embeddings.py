"""Benchmark precomputed embeddings: bytes per sample and prior training steps/s, caption encodings stored vs
recomputed from token ids by the frozen CLIP's text tower.

    python scripts/bench_embeddings.py [--quick]

Writes a small shard set with the project's writer (``unclip.data.writer.write_shards``), embeds it twice with a
random-weights tiny CLIP (conf/model/clip/tiny.yaml: D = 128, text width 128, context 32), once per
``store_token_encodings`` setting, and reports:

* ``embeddings/<mode>``: ``bytes_per_sample`` measured from the ``.npz`` files (and with their sidecars and
  meta.json), and ``read_samples_per_s`` of the training pipeline reading captions and embeddings (no images);
* ``embeddings/paper_<mode>``: bytes per sample at the paper's sizes, from the shapes (ViT-H/16: D = 1024, text
  width 1024, context 77; float16 z_i, z_t and encodings, bool mask, uint16 ids), and the total for 650M pairs;
* ``prior_train_step/<mode>``: steps/s of the tiny prior (conf/model/prior/tiny.yaml) built as ``unclip-train
  stage=prior`` builds it on each folder: its conditioner (stored encodings, or the text tower recomputing them
  on the training device) + forward + backward + AdamW step, timed after warm-up steps on batches read beforehand.

Prints a JSON list of ``{"workload", "metric", "value", "unit"}``. Run with nothing else on the machine.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_common import device, stage_module, suite_main, timed  # noqa: E402

from unclip.data.embeddings import META_FILE  # noqa: E402

MODES = {"stored": True, "recomputed": False}  # workload name -> unclip-embed store_token_encodings
PAPER = {"embed_dim": 1024, "text_width": 1024, "context_length": 77}  # ViT-H/16 (conf/model/clip/paper.yaml)
PAPER_PAIRS = 650_000_000
BATCH = 64
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


def paper_bytes_per_sample(store_token_encodings: bool, embed_dim: int = PAPER["embed_dim"],
                           text_width: int = PAPER["text_width"], context_length: int = PAPER["context_length"]) -> int:
    """Array bytes of one sample's record (no archive overhead): z_i and z_t in float16, uint16 ids, and with
    stored encodings ctx x width float16 plus a bool mask."""
    size = 2 * embed_dim * 2 + context_length * 2
    if store_token_encodings:
        size += context_length * text_width * 2 + context_length
    return size


def write_bench_shards(out: Path, samples: int) -> list[str]:
    """``samples`` 64px captioned images in two shards, through the project's shard writer."""
    from PIL import Image

    from unclip.data.writer import EncodeOptions, SourceSample, write_shards

    def inputs():
        for i in range(samples):
            color = COLORS[i % len(COLORS)]
            rgb = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
            caption = f"a {color} square number {i} on a plain background" + " with a border" * (i % 3)
            yield SourceSample(f"synthetic#{i}", Image.new("RGB", (64, 64), rgb), caption)

    stats = write_shards(inputs(), out, EncodeOptions(), samples_per_shard=(samples + 1) // 2)
    return sorted(str(p) for p in out.glob("*.tar")) if stats["written"] == samples else []


def embed_both_ways(tmp: Path, shards: list[str]) -> dict[str, Path]:
    """Embed ``shards`` with a random tiny CLIP into one folder per mode."""
    import yaml

    from unclip.embed import run_embed
    from unclip.models.clip import build_clip, clip_metadata, export_open_clip

    cfg = yaml.safe_load((ROOT / "conf" / "model" / "clip" / "tiny.yaml").read_text())
    torch.manual_seed(0)
    clip, oc_cfg = build_clip(cfg)
    export_open_clip(clip, clip_metadata(clip, cfg, oc_cfg), tmp / "clip")
    folders = {}
    for mode, store in MODES.items():
        folders[mode] = tmp / f"emb_{mode}"
        run_embed(str(tmp / "clip"), shards, str(folders[mode]), batch_size=128, num_workers=0, rank=0, world_size=1,
                  device="cpu", progress=False, store_token_encodings=store)
    return folders


def read_batches(shards: list[str], emb: Path, batches: int) -> tuple[list[dict], float]:
    """``batches`` training batches (captions and embeddings, no images), cycling the shards; and samples/s read."""
    from unclip.data.decode import SampleDecoder
    from unclip.data.pipeline import ShardDataset

    dataset = ShardDataset(shards, batch_size=BATCH, image_size=64, shuffle_buffer=0, embeddings=str(emb),
                           drop_last=True, decoder=SampleDecoder(require=("caption",), decode_images=False))
    out, start = [], time.perf_counter()
    while len(out) < batches:
        out += list(dataset)
    seconds = time.perf_counter() - start
    return out[:batches], len(out) * BATCH / seconds


def bench_prior_steps(emb: Path, shards: list[str], batches: list[dict], steps: int) -> float:
    """Median seconds per prior training step on ``emb`` (conditioning + forward + backward + AdamW)."""
    from hydra.utils import instantiate

    dev = device()
    module = stage_module(["stage=prior", "model/prior=tiny", "clip_ckpt=null", f"data.embeddings={emb}",
                           f"data.train_shards=[{','.join(shards)}]", "data.val_shards=null",
                           "data.decode_images=false"])
    module.setup("fit")
    module.configure_model()
    module.to(dev)
    optimizer = instantiate(module.hparams.optimizer, _convert_="all")(module.net.parameters())
    on_device = [{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    cursor = iter(range(10**9))

    def step() -> None:
        batch = on_device[next(cursor) % len(on_device)]
        cond = module.condition(batch)
        x0 = module.net.scale(cond["image_embed"])
        t = torch.randint(0, module.process.num_timesteps, (x0.shape[0],), device=dev)
        extra = {k: cond[k] for k in ("text_embed", "text_tokens", "text_mask")}
        extra["cond_drop_mask"] = torch.rand(x0.shape[0], device=dev) < module.cond_drop_prob
        module.process.training_losses(module.net, x0, t, extra)["loss"].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return statistics.median(timed(step, steps, dev, warmup=2))


def run(quick: bool = False) -> list[dict]:
    samples, steps = (2 * BATCH, 3) if quick else (8 * BATCH, 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards = write_bench_shards(tmp / "shards", samples)
        if not shards:
            raise RuntimeError("the shard writer skipped some generated samples")
        folders = embed_both_ways(tmp, shards)
        for mode, emb in folders.items():
            npz = sum(p.stat().st_size for p in emb.glob("*.npz"))
            everything = npz + sum(p.stat().st_size for p in emb.glob("*.json"))
            assert (emb / META_FILE).is_file()
            batches, read_rate = read_batches(shards, emb, 4)
            per_step = bench_prior_steps(emb, shards, batches, steps)
            paper = paper_bytes_per_sample(MODES[mode])
            rows += [{"workload": f"embeddings/{mode}", "metric": "bytes_per_sample", "value": round(npz / samples, 1),
                      "unit": "B"},
                     {"workload": f"embeddings/{mode}", "metric": "bytes_per_sample_with_sidecars",
                      "value": round(everything / samples, 1), "unit": "B"},
                     {"workload": f"embeddings/{mode}", "metric": "read_samples_per_s", "value": round(read_rate, 1),
                      "unit": "samples/s"},
                     {"workload": f"embeddings/paper_{mode}", "metric": "bytes_per_sample", "value": paper,
                      "unit": "B"},
                     {"workload": f"embeddings/paper_{mode}", "metric": "total_650M_pairs",
                      "value": round(paper * PAPER_PAIRS / 1e12, 2), "unit": "TB"},
                     {"workload": f"prior_train_step/{mode}", "metric": "steps_per_s", "value": round(1 / per_step, 2),
                      "unit": "steps/s"},
                     {"workload": f"prior_train_step/{mode}", "metric": "s_per_step", "value": round(per_step, 4),
                      "unit": "s"}]
    sizes = {r["workload"]: r["value"] for r in rows if r["metric"] == "bytes_per_sample"}
    rows.append({"workload": "embeddings", "metric": "stored_over_recomputed_bytes",
                 "value": round(sizes["embeddings/stored"] / sizes["embeddings/recomputed"], 1), "unit": "x"})
    assert np.isfinite([r["value"] for r in rows]).all()
    return rows


if __name__ == "__main__":
    sys.exit(suite_main(run, __doc__))
