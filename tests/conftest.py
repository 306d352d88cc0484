"""Shared fixtures: compose the real Hydra configs (as the template's conftest does) and shrink them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from unclip.config import register_resolvers

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
EMOJI = Path(os.environ.get("UNCLIP_EMOJI_ROOT", ROOT.parent / "shared" / "data" / "emoji"))

# Tests run beside nothing else on 2 cores only when told so; keep torch to one thread per process
# so a test spawning workers or DDP ranks does not oversubscribe the machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_train(overrides: list[str]):
    """Compose conf/train.yaml with overrides (resolvers registered)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture
def emoji_root() -> Path:
    if not (EMOJI / "train" / "00000.tar").exists():
        pytest.skip(f"emoji shards not found at {EMOJI} (set UNCLIP_EMOJI_ROOT)")
    return EMOJI


def make_tiny_clip_export(directory: Path, seed: int = 0) -> Path:
    """A random-weights tiny CLIP (conf/model/clip/tiny.yaml) exported as later stages load it."""
    import torch
    from omegaconf import OmegaConf

    from unclip.models.clip import build_clip, clip_metadata, export_open_clip

    torch.manual_seed(seed)
    model_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "clip" / "tiny.yaml"))
    model, oc_cfg = build_clip(model_cfg)
    return export_open_clip(model, clip_metadata(model, model_cfg, oc_cfg), directory)


@pytest.fixture(scope="session")
def tiny_clip_export(tmp_path_factory) -> Path:
    """Session-wide tiny CLIP export (random weights): enough to test chaining and shapes."""
    return make_tiny_clip_export(tmp_path_factory.mktemp("tiny_clip") / "clip_export")


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory, tiny_clip_export) -> dict[str, Path]:
    """Session-wide random-weights chain CLIP → prior → 16px decoder → 16→32 upsampler (tests/tiny_chain.py)."""
    from tests.tiny_chain import make_tiny_chain

    return make_tiny_chain(tmp_path_factory.mktemp("tiny_chain"), tiny_clip_export)
