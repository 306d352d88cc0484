"""Probe a demo chain: do its samples follow their captions? Caption accuracy on seen and held-out combinations.

Loads the chain that ``unclip-demo`` trained (CLIP, prior, decoder, upsampler checkpoints), takes N validation
samples of the demo shapes (half seen, half held-out colour x shape pairs) and reads every generated image back
with ``demo_shapes_check`` (shape, colour, background, size, position from the pixels):

* ``real``: the val images themselves (the checker's ceiling, about 1.0);
* ``recon``: decoder(true CLIP image embedding of the val image) -> upsampler: the decoder's quality alone;
* ``text``: prior(caption) -> decoder -> upsampler: the text-to-image chain, the demo's real job;
* ``*_32``: the same before the upsampler (decoder output, 32px).

It also measures the CLIP (zero-shot attribute accuracy: the caption with the right colour / shape among all
colours / shapes, everything else kept, scored by cosine with z_i) and the prior (cosine of its z_i with the val
image's true z_i, against the text-embedding baseline cos(z_t, z_i)), and writes ``probe.json`` and ``grid.png``
(one row per caption: real, recon, text->image; held-out captions marked with *).

    python scripts/probe_demo.py --run runs/demo --n 64 --out runs/demo/probe
    python scripts/probe_demo.py --run runs/demo --decoder-guidance 3 --prior-guidance 2   # try sampling settings
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from unclip.data.demo_shapes import COLORS, POSITIONS, SHAPES, SIZES, DemoShapesConfig, ensure_demo_shards
from unclip.data.demo_shapes_check import caption_accuracy, parse_caption
from unclip.data.shards import expand_shards
from unclip.decoder_sampling import load_decoder, load_upsampler, sample_decoder, sample_upsampler
from unclip.diffusion import create_diffusion
from unclip.models.clip_embedder import FrozenCLIP
from unclip.models.prior_sampling import load_prior, sample_prior
from unclip.stages import ClipInfo

STAGES = ("clip", "prior", "decoder", "upsampler")


def iter_split(split: str) -> Iterator[dict]:
    """Samples of a demo split in shard order: {"image" [3, 64, 64] in [-1, 1], "caption", "held_out", "meta"}."""
    for url in expand_shards(ensure_demo_shards(DemoShapesConfig())[split], split):
        with tarfile.open(url) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for key in sorted({name.rsplit(".", 1)[0] for name in members}):
                meta = json.loads(tar.extractfile(members[f"{key}.json"]).read())
                img = Image.open(io.BytesIO(tar.extractfile(members[f"{key}.png"]).read())).convert("RGB")
                yield {"image": torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1).permute(2, 0, 1),
                       "caption": tar.extractfile(members[f"{key}.txt"]).read().decode(),
                       "held_out": bool(meta.get("held_out")), "meta": meta}


def read_val(n: int) -> list[dict]:
    """The first n - n // 2 seen and n // 2 held-out samples of the val split."""
    want = {False: n - n // 2, True: n // 2}
    out = []
    for sample in iter_split("val"):
        if want[sample["held_out"]] > 0:
            want[sample["held_out"]] -= 1
            out.append(sample)
        if not any(want.values()):
            break
    return out


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> PIL images."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def split_accuracy(captions: list[str], images: list[Image.Image], held: list[bool]) -> dict[str, dict]:
    """caption_accuracy over all, seen and held-out samples."""
    result = {}
    for name, keep in (("all", [True] * len(held)), ("seen", [not h for h in held]), ("held_out", held)):
        idx = [i for i, k in enumerate(keep) if k]
        if idx:
            result[name] = caption_accuracy([captions[i] for i in idx], [images[i] for i in idx])
    return result


def clip_attribute_accuracy(clip: FrozenCLIP, z_i: torch.Tensor, captions: list[str], held: list[bool]) -> dict:
    """Zero-shot: does cos(z_i, z_t) pick the right colour (shape) among captions differing only in it?"""
    result: dict[str, dict] = {}
    for attr, values in (("color", list(COLORS)), ("shape", list(SHAPES))):
        correct = []
        for i, cap in enumerate(captions):
            want = parse_caption(cap)[attr]
            variants = []
            for v in values:  # swap the attribute word in place (article fixed up for a/an)
                words = cap.split(" ")
                words = [v if w == want else w for w in words]
                words[0] = "an" if words[1][0] in "aeiou" else "a"
                variants.append(" ".join(words))
            z_t = clip.embed_text(clip.tokenize(variants))["text_embed"]  # [V, D]
            correct.append(values[int((z_t @ z_i[i]).argmax())] == want)
        correct_arr = np.array(correct)
        held_arr = np.array(held)
        result[attr] = {"all": float(correct_arr.mean()), "seen": float(correct_arr[~held_arr].mean()),
                        "held_out": float(correct_arr[held_arr].mean())}
    return result


def knn_accuracy(z_i: torch.Tensor, samples: list[dict]) -> dict:
    """Leave-one-out 1-nearest-neighbour accuracy (cosine) of colour and shape among the probed val images: does
    the CLIP image embedding separate them at all (whatever its text side does)?"""
    sim = z_i @ z_i.T
    sim.fill_diagonal_(-2)
    nearest = sim.argmax(1).tolist()
    return {attr: float(np.mean([samples[j]["meta"][attr] == samples[i]["meta"][attr] for i, j in enumerate(nearest)]))
            for attr in ("color", "shape", "background", "size")}


def fit_probe(z: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax regression on features z [N, D] for labels y [N] (LBFGS, small L2); returns (w [D, C], b [C])."""
    w = torch.zeros(z.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(10 * z @ w + b, y) + 1e-4 * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(clip: FrozenCLIP, n_train: int, batch: int) -> dict:
    """Is an attribute linearly readable from z_i? Multinomial logistic regression (L-BFGS) on n_train train images'
    z_i, scored on the whole val split, seen and held-out pairs apart. Chance: 1/8 shapes, 1/8 colours."""
    def embed(rows: list[dict]) -> torch.Tensor:
        return torch.cat([clip.embed_images(torch.stack([r["image"] for r in rows[i:i + batch]]))
                          for i in range(0, len(rows), batch)])
    train, val = list(itertools.islice(iter_split("train"), n_train)), list(iter_split("val"))
    z_train, z_val = embed(train), embed(val)
    held = np.array([r["meta"]["held_out"] for r in val])
    result = {}
    for attr in ("shape", "color", "background", "size", "position"):
        classes = sorted({r["meta"][attr] for r in train})
        y = torch.tensor([classes.index(r["meta"][attr]) for r in train])
        w, b = fit_probe(z_train, y, len(classes))
        pred = (10 * z_val @ w + b).argmax(1).numpy()
        right = np.array([classes[k] == r["meta"][attr] for k, r in zip(pred, val, strict=True)])
        result[attr] = {"seen": float(right[~held].mean()), "held_out": float(right[held].mean())}
    return result


def label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    draw.text(xy, text, fill=(0, 0, 0))


def write_grid(path: Path, captions: list[str], held: list[bool], columns: dict[str, list[Image.Image]],
               rows: int, scale: int = 2) -> None:
    """One row per caption: one image per column (real, recon, text), then the caption."""
    side = 64 * scale
    names = list(columns)
    text_w = 420
    grid = Image.new("RGB", (len(names) * (side + 4) + text_w, 16 + rows * (side + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(names):
        label(draw, (c * (side + 4) + 2, 2), name)
    for r in range(rows):
        y = 16 + r * (side + 4)
        for c, name in enumerate(names):
            grid.paste(columns[name][r].resize((side, side), Image.Resampling.NEAREST), (c * (side + 4), y))
        label(draw, (len(names) * (side + 4) + 4, y + side // 2 - 6), ("* " if held[r] else "  ") + captions[r])
    grid.save(path)


def find_chain(run: Path) -> dict[str, Path]:
    return {s: run / s / "checkpoints" / "last.ckpt" for s in STAGES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="unclip-demo --out folder")
    for s in STAGES:
        parser.add_argument(f"--{s}", type=Path, default=None, help=f"{s} checkpoint (default: RUN/{s}/...)")
    parser.add_argument("--n", type=int, default=64, help="val samples (half seen, half held-out)")
    parser.add_argument("--grid-rows", type=int, default=16, help="captions in grid.png (first half seen)")
    parser.add_argument("--out", type=Path, default=None, help="probe.json and grid.png (default: RUN/probe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64, help="samples per sampling batch")
    parser.add_argument("--prior-steps", type=int, default=64)
    parser.add_argument("--prior-guidance", type=float, default=1.0)
    parser.add_argument("--prior-candidates", type=int, default=2)
    parser.add_argument("--decoder-steps", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--decoder-guidance", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--decoder-sampler", default=None,
                        help="ddpm | ddim | dpmpp_2m | heun (default: the checkpoint's)")
    parser.add_argument("--decoder-spacing", default=None, help="strided | logsnr | karras (default: the checkpoint's)")
    parser.add_argument("--upsampler-steps", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--no-upsampler", action="store_true", help="score the 32px decoder output only")
    parser.add_argument("--linear-probe", type=int, default=0, metavar="N_TRAIN",
                        help="also fit a linear probe of each attribute on N_TRAIN train images' z_i (2000: ~1 min)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["recon", "text"], help="probes to leave out")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    ckpts = {s: getattr(args, s) or p for s, p in find_chain(args.run).items()}
    out = args.out or args.run / "probe"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    samples = read_val(args.n)
    captions = [s["caption"] for s in samples]
    held = [s["held_out"] for s in samples]
    images = torch.stack([s["image"] for s in samples])  # [N, 3, 64, 64]
    clip = FrozenCLIP.from_path(ckpts["clip"])
    z_i = torch.cat([clip.embed_images(images[i:i + args.batch]) for i in range(0, len(images), args.batch)])
    text = clip.embed_text(clip.tokenize(captions))
    report: dict = {"checkpoints": {k: str(v) for k, v in ckpts.items()}, "n": len(samples),
                    "n_held_out": int(sum(held)),
                    "chance": {"shape": 1 / len(SHAPES), "color": 1 / (len(COLORS) - 1),  # never the background
                               "background": 1 / len(COLORS), "size": 1 / len(SIZES), "position": 1 / len(POSITIONS)},
                    "accuracy": {"real": split_accuracy(captions, to_pil(images), held)}}
    report["clip_zero_shot"] = clip_attribute_accuracy(clip, z_i, captions, held)
    report["clip_image_knn"] = knn_accuracy(z_i, samples)
    if args.linear_probe:
        report["clip_linear_probe"] = linear_probe(clip, args.linear_probe, args.batch)
    report["cos_text_image"] = float((text["text_embed"] * z_i).sum(-1).mean())
    timings["clip"] = time.perf_counter() - start

    if {"recon", "text"} <= set(args.skip):  # the CLIP alone: no decoder needed
        (out / "probe.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({k: report.get(k) for k in ("clip_zero_shot", "clip_image_knn", "clip_linear_probe")},
                         indent=1))
        return 0
    decoder, dmeta = load_decoder(ckpts["decoder"])
    upsampler, umeta = (None, None) if args.no_upsampler else load_upsampler(ckpts["upsampler"])
    uses_text = dmeta.text_conditioning  # then the caption conditions the decoder too
    decoder_options = {k: v for k, v in (("sampler", args.decoder_sampler), ("spacing", args.decoder_spacing))
                       if v is not None}

    def decode(embeds: torch.Tensor, name: str) -> list[Image.Image]:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed)  # the same x_T for every probe: they differ only in z_i
        low, high = [], []
        for i in range(0, len(embeds), args.batch):
            tokens = {"text_tokens": text["text_tokens"][i:i + args.batch],
                      "text_mask": text["text_mask"][i:i + args.batch]} if uses_text else {}
            x = sample_decoder(decoder, dmeta, embeds[i:i + args.batch], **tokens, steps=args.decoder_steps,
                               guidance_scale=args.decoder_guidance, generator=gen, **decoder_options)
            low.append(x)
            if upsampler is not None:
                high.append(sample_upsampler(upsampler, umeta, x, steps=args.upsampler_steps, generator=gen))
        low_pil = to_pil(torch.cat(low))
        report["accuracy"][f"{name}_32"] = split_accuracy(captions, low_pil, held)
        result = to_pil(torch.cat(high)) if high else low_pil
        if high:
            report["accuracy"][name] = split_accuracy(captions, result, held)
        timings[name] = time.perf_counter() - t0
        return result

    columns: dict[str, list[Image.Image]] = {"real": to_pil(images)}
    if "recon" not in args.skip:
        columns["recon"] = decode(z_i, "recon")
    if "text" not in args.skip:
        t0 = time.perf_counter()
        prior, pmeta = load_prior(ckpts["prior"])
        pmeta.check(ClipInfo.of(clip))
        process = create_diffusion(**pmeta.diffusion)
        z_prior = torch.cat([
            sample_prior(prior, {k: v[i:i + args.batch] for k, v in text.items()}, process, steps=args.prior_steps,
                         guidance_scale=args.prior_guidance, candidates=args.prior_candidates,
                         generator=torch.Generator().manual_seed(args.seed + 1))
            for i in range(0, len(samples), args.batch)])
        cos_prior = (z_prior * z_i).sum(-1)
        held_t = torch.tensor(held)
        report["prior"] = {"cos_true": float(cos_prior.mean()), "cos_true_seen": float(cos_prior[~held_t].mean()),
                           "cos_true_held_out": float(cos_prior[held_t].mean()),
                           "cos_text_baseline": report["cos_text_image"],
                           "steps": args.prior_steps, "guidance": args.prior_guidance}
        timings["prior"] = time.perf_counter() - t0
        columns["text"] = decode(z_prior, "text")
    report["sampling"] = {"decoder": {**dmeta.sampling, **decoder_options, **{k: v for k, v in (
        ("steps", args.decoder_steps), ("guidance_scale", args.decoder_guidance)) if v is not None}},
        "upsampler": None if umeta is None else {**umeta.sampling, **(
            {"steps": args.upsampler_steps} if args.upsampler_steps else {})}}
    report["seconds"] = {k: round(v, 1) for k, v in {**timings, "total": time.perf_counter() - start}.items()}

    rows = min(args.grid_rows, len(samples))
    order = [i for i in range(len(samples)) if not held[i]][: rows - rows // 2] + \
            [i for i in range(len(samples)) if held[i]][: rows // 2]
    write_grid(out / "grid.png", [captions[i] for i in order], [held[i] for i in order],
               {k: [v[i] for i in order] for k, v in columns.items()}, len(order))
    (out / "probe.json").write_text(json.dumps(report, indent=2))
    brief = {k: {s: {a: round(v[s][a], 3) for a in ("color", "shape", "all")} for s in ("seen", "held_out")}
             for k, v in report["accuracy"].items()}
    print(json.dumps({"accuracy": brief, "chance": report["chance"], "clip_zero_shot": report["clip_zero_shot"],
                      "clip_image_knn": report["clip_image_knn"], "clip_linear_probe": report.get("clip_linear_probe"),
                      "prior": report.get("prior"), "seconds": report["seconds"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
