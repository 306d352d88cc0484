"""open_clip folders made the way open_clip makes them (``push_to_hf_hub.save_for_hf``), with random weights of
tiny architectures: what a user gets from ``save_for_hf`` or by downloading a hub repo, without any download."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.push_to_hf_hub import save_for_hf

# A tiny ViT CLIP (32px, 16-token captions) in open_clip's model_cfg format.
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def shrunk_vit_l14_cfg() -> dict:
    """OpenAI's ViT-L/14 with its CLIP-facing sizes (768-d embedding, 768-wide text, 77 tokens, 224px, 14px patches,
    QuickGELU) and one narrow block per tower: the full one is ~430M parameters."""
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-L-14-quickgelu"))
    cfg["vision_cfg"].update(layers=1, width=64, head_width=32)
    cfg["text_cfg"].update(layers=1)
    return cfg


class NoTokenizerFiles:
    """``save_for_hf`` also saves the tokenizer; the CLIP BPE vocabulary ships inside open_clip (SimpleTokenizer has
    no files), so there is nothing to write for it."""

    def save_pretrained(self, directory: str | Path) -> None:
        pass


def write_open_clip_folder(directory: Path, model_cfg: dict | None = None, mean=None, std=None, seed: int = 0,
                           safe_serialization: bool | str = True) -> Path:
    """A random-weights CLIP saved by open_clip's own writer: ``open_clip_config.json`` (model_cfg +
    preprocess_cfg) and ``open_clip_model.safetensors`` (True), ``open_clip_pytorch_model.bin`` (False) or both."""
    model_cfg = copy.deepcopy(model_cfg or TINY_CFG)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    set_model_preprocess_cfg(model, {"size": model_cfg["vision_cfg"]["image_size"],
                                     "mean": tuple(mean or open_clip.OPENAI_DATASET_MEAN),
                                     "std": tuple(std or open_clip.OPENAI_DATASET_STD)})
    save_for_hf(model, NoTokenizerFiles(), model_cfg, str(directory), safe_serialization=safe_serialization)
    return Path(directory)


def register_arch(directory: Path, name: str, model_cfg: dict) -> str:
    """Register ``model_cfg`` as open_clip architecture ``name`` (as a model_configs/*.json file would)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(directory / f"{name}.json")
    return name
