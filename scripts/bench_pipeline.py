"""Whole-chain latency: text → image and variations through ``UnCLIPPipeline`` at the demo's sizes.

The chain is the demo's (``unclip-demo``): the tiny CLIP of ``demo_clip_tiny`` (conf/model/clip/tiny_resnet.yaml,
64px, 128-d), the prior of ``experiment=demo_prior_tiny``, the 32px decoder of ``demo_decoder_tiny`` and the
32 → 64px upsampler of ``demo_upsampler_tiny``, each with random weights (latency does not depend on the weights)
and each stage's own sampling config (prior: sample_prior's defaults; decoder: DPM-Solver++(2M) 20 log-SNR steps,
guidance 2; upsampler: DDIM 15). The checkpoints are written to a temporary folder exactly as training would write them
(state_dict + ``checkpoint["unclip"]`` metadata) and loaded through :meth:`UnCLIPPipeline.from_checkpoints`.

* ``pipeline/text2image_8prompts``: 8 captions → 8 final 64px images. ``s_per_image`` is the whole call
  (``pipe(prompts)``) over 8; ``prior_s``, ``decoder_s``, ``upsampler_s`` (and ``clip_text_s``) split the same
  chain stage by stage (``encode_text``, ``prior_embeddings``, ``sample_decoder``, ``sample_upsampler``).
* ``pipeline/variations_1x4``: one image → 4 variations (CLIP image embedding, DDIM inversion, DDIM η = 1
  decoding of 4, upsampling); ``invert_s`` is the inversion alone.

    python scripts/bench_pipeline.py [--quick]      # prints a JSON list of {"workload", "metric", "value", "unit"}

``run(quick)`` is called by scripts/bench.py in a process of its own (its peak RSS row is added there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import compose_train, save_stage, stage_module  # noqa: E402

PROMPTS = ["a small red circle on a blue background", "a large green square on a white background",
           "a yellow triangle on a black background", "two blue circles on a yellow background",
           "a purple star on a grey background", "a small orange square on a green background",
           "a large white circle on a red background", "a pink triangle on a blue background"]


def demo_chain(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Random-weights checkpoints of the demo chain (CLIP export, prior, decoder, upsampler) in ``directory``."""
    from omegaconf import OmegaConf

    from unclip.models.clip import build_clip, clip_metadata, export_open_clip

    torch.manual_seed(seed)
    model_cfg = OmegaConf.to_container(compose_train(["stage=clip", "experiment=demo_clip_tiny"]).model)
    clip_model, oc_cfg = build_clip(model_cfg)
    clip = export_open_clip(clip_model, clip_metadata(clip_model, model_cfg, oc_cfg), directory / "clip")
    prior = save_stage(stage_module(["stage=prior", "experiment=demo_prior_tiny", f"clip_ckpt={clip}"]),
                       directory / "prior.ckpt")
    decoder = save_stage(stage_module(["stage=decoder", "experiment=demo_decoder_tiny", f"clip_ckpt={clip}"]),
                         directory / "decoder.ckpt")
    upsampler = save_stage(stage_module(["stage=upsampler", "experiment=demo_upsampler_tiny",
                                         f"decoder_ckpt={decoder}"]), directory / "upsampler.ckpt")
    return {"clip": clip, "prior": prior, "decoder": decoder, "upsampler": upsampler}


def _timed(fn: Callable[[], object], sync: bool) -> tuple[float, object]:
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench_text2image(pipe, repeats: int) -> list[dict]:
    """The whole ``pipe(prompts)`` call and the same chain split by stage; medians over ``repeats``."""
    from unclip.decoder_sampling import sample_decoder, sample_upsampler

    sync = pipe.device.type == "cuda"
    n = len(PROMPTS)
    pipe(PROMPTS[:1], seed=0, output_type="pt")  # warm-up: allocator, oneDNN primitives, tokenizer
    whole, split = [], {"clip_text_s": [], "prior_s": [], "decoder_s": [], "upsampler_s": []}
    for r in range(repeats):
        seconds, _ = _timed(lambda: pipe(PROMPTS, seed=r, output_type="pt"), sync)
        whole.append(seconds)
        g = torch.Generator(pipe.device).manual_seed(r)
        seconds, text = _timed(lambda: pipe.encode_text(PROMPTS), sync)
        split["clip_text_s"].append(seconds)
        seconds, z = _timed(lambda: pipe.prior_embeddings(text, g), sync)
        split["prior_s"].append(seconds)
        dec = pipe.chain.decoder
        with torch.no_grad(), pipe._autocast():
            seconds, images = _timed(lambda: sample_decoder(dec.net, dec.info, z, **pipe._decoder_text(text),
                                                            generator=g), sync)
            split["decoder_s"].append(seconds)
            total = 0.0
            for stage in pipe.chain.upsamplers:
                seconds, images = _timed(lambda: sample_upsampler(stage.net, stage.info, images.float(), generator=g),
                                         sync)
                total += seconds
            split["upsampler_s"].append(total)
    w = f"pipeline/text2image_{n}prompts/{pipe.output_size}px/{pipe.device.type}"
    rows = [{"workload": w, "metric": "s_per_image", "value": round(statistics.median(whole) / n, 4), "unit": "s"},
            {"workload": w, "metric": "s_per_call", "value": round(statistics.median(whole), 3), "unit": "s"}]
    rows += [{"workload": w, "metric": k, "value": round(statistics.median(v), 3), "unit": "s"}
             for k, v in split.items()]
    return rows


def bench_variations(pipe, repeats: int, warmup: bool) -> list[dict]:
    """One image → 4 variations (encode, DDIM inversion, DDIM η=1 decoding, upsampling), and the inversion alone."""
    sync = pipe.device.type == "cuda"
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if warmup:  # the networks are already warm from text → image; this warms the batch-of-4 shapes
        pipe.variations(image, num_variations=4, seed=0, output_type="pt")
    whole, invert = [], []
    for r in range(repeats):
        seconds, _ = _timed(lambda: pipe.variations(image, num_variations=4, seed=r, output_type="pt"), sync)
        whole.append(seconds)
        seconds, _ = _timed(lambda: pipe.invert(image), sync)
        invert.append(seconds)
    w = f"pipeline/variations_1x4/{pipe.output_size}px/{pipe.device.type}"
    return [{"workload": w, "metric": "s_per_call", "value": round(statistics.median(whole), 3), "unit": "s"},
            {"workload": w, "metric": "s_per_image", "value": round(statistics.median(whole) / 4, 4), "unit": "s"},
            {"workload": w, "metric": "invert_s", "value": round(statistics.median(invert), 3), "unit": "s"}]


def run(quick: bool = False) -> list[dict]:
    """Build the demo chain with random weights, then time text → image and variations."""
    from unclip.pipeline import UnCLIPPipeline

    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        paths = demo_chain(Path(tmp))
        pipe = UnCLIPPipeline.from_checkpoints(clip=paths["clip"], prior=paths["prior"], decoder=paths["decoder"],
                                               upsamplers=[paths["upsampler"]])
    return bench_text2image(pipe, repeats) + bench_variations(pipe, repeats, warmup=not quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed repeat instead of three")
    print(json.dumps(run(parser.parse_args(argv).quick), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
