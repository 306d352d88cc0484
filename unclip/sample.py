"""``unclip-sample``: a checkpoint chain → PNGs, ``grid.png`` and ``samples.json`` (what each file shows, settings).

Modes (``mode=``): text (prompts → images), variations, interpolate, text_diff and edit; see conf/sample.yaml.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from unclip.config import ConfigError, conf_dir, register_resolvers, require_keys

register_resolvers()
CONF_DIR = conf_dir()
MODES = ("text", "variations", "interpolate", "text_diff", "edit")
NEEDS = {"text": ("prior_ckpt",), "variations": ("image",), "interpolate": ("image", "image_b"),
         "text_diff": ("image", "to_caption"), "edit": ("prior_ckpt", "image", "mask")}


def read_prompts(cfg: DictConfig) -> list[str]:
    prompts = [str(p) for p in cfg.prompts or []]
    if cfg.prompts_file:
        prompts += [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines() if line.strip()]
    return prompts


def check_config(cfg: DictConfig) -> None:
    """Fail before loading anything, naming the key."""
    require_keys(cfg, "clip_ckpt", "decoder_ckpt")
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not one of {MODES}")
    for key in NEEDS[cfg.mode]:
        if cfg[key] in (None, ""):
            raise ConfigError(f"mode={cfg.mode} needs '{key}'")
    if cfg.mode in ("text", "edit") and not read_prompts(cfg):
        raise ConfigError(f"mode={cfg.mode} needs 'prompts' or 'prompts_file'")


def prior_options(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.prior`` as the plain dict the pipeline takes, naming the key when it is not a mapping."""
    options = OmegaConf.to_container(cfg.prior)
    if not isinstance(options, dict):
        raise ConfigError(f"'prior' must be a mapping of sampling options, got {options!r}")
    return {str(k): v for k, v in options.items()}


def run(cfg: DictConfig) -> dict:
    """Sample as configured and write the files; returns what samples.json holds."""
    from unclip.images import image_grid, save_pngs
    from unclip.pipeline import UnCLIPPipeline

    check_config(cfg)
    start = time.perf_counter()
    pipe = UnCLIPPipeline.from_checkpoints(clip=cfg.clip_ckpt, prior=cfg.prior_ckpt, decoder=cfg.decoder_ckpt,
                                           upsamplers=list(cfg.upsampler_ckpts or []), device=cfg.device)
    # decoder: a mapping or None; upsamplers: None, one mapping for all, or a list with one per upsampler.
    knobs: dict[str, Any] = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("decoder", "upsamplers")}
    common: dict[str, Any] = {"seed": int(cfg.seed), "output_type": "pt", "progress": True}
    n, prompts = int(cfg.num_images), read_prompts(cfg)
    captions: list[str] | None = None
    if cfg.mode == "text":
        out = pipe(prompts, n, prior=prior_options(cfg), batch_size=int(cfg.batch_size), **knobs,
                   **common)
        images, captions = out.images, out.prompts
    elif cfg.mode == "variations":
        images = pipe.variations(cfg.image, n, float(cfg.eta), inversion_iters=int(cfg.inversion_iters), **knobs,
                                 **common).images
    elif cfg.mode == "interpolate":
        images = pipe.interpolate(cfg.image, cfg.image_b, n, latents=cfg.latents,
                                  inversion_iters=int(cfg.inversion_iters), **knobs, **common).images
    elif cfg.mode == "text_diff":
        images = pipe.text_diff(cfg.image, cfg.from_caption, cfg.to_caption, list(cfg.thetas),
                                inversion_iters=int(cfg.inversion_iters), **knobs, **common).images
    else:
        edits = [pipe.edit(cfg.image, cfg.mask, p, n, method=cfg.edit_method, jump_length=int(cfg.jump_length),
                           jump_n_sample=int(cfg.jump_n_sample), prior=prior_options(cfg), **knobs,
                           **common) for p in prompts]
        # each edit gives n images of its prompt, in prompt order
        images, captions = torch.cat([e.images for e in edits]), [p for p in prompts for _ in range(n)]
    images = images * 2 - 1  # pt output is [0, 1], quantised like the PNGs
    out_dir = Path(cfg.out_dir)
    names = [f"{i:05d}" for i in range(images.shape[0])]
    paths = save_pngs(images, out_dir, names)
    nrow = int(cfg.grid_nrow or (n if cfg.mode in ("text", "edit", "variations") else images.shape[0]))
    image_grid(images, nrow).save(out_dir / "grid.png")
    files = [{"file": p.name, **({"prompt": captions[i]} if captions else {})} for i, p in enumerate(paths)]
    prior = prior_options(cfg) if cfg.prior_ckpt else None
    record = {"mode": cfg.mode, "files": files, "settings": pipe.settings(prior, **knobs), "seed": int(cfg.seed),
              "seconds": round(time.perf_counter() - start, 1)}
    (out_dir / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    record = run(cfg)
    print(json.dumps({"out_dir": str(cfg.out_dir), "images": len(record["files"]), "seconds": record["seconds"]}))


if __name__ == "__main__":
    main()
