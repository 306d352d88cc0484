"""Shared fixtures: compose the real Hydra configs (as the template's conftest does) and shrink them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.emoji_like import build_emoji_like, emoji_like_root, has_shards
from unclip.config import register_resolvers
from unclip.data.demo_shapes import default_cache_dir

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
# The emoji shards when UNCLIP_EMOJI_ROOT points at them; otherwise a stand-in of the same layout built from the demo
# generator (tests/emoji_like.py) in pytest_configure. Either way UNCLIP_EMOJI_ROOT is set to it for the session,
# so data=emoji and child processes read the same set.
_GIVEN = os.environ.get("UNCLIP_EMOJI_ROOT")
EMOJI_IS_REAL = bool(_GIVEN) and has_shards(Path(_GIVEN))
EMOJI = Path(_GIVEN) if EMOJI_IS_REAL else emoji_like_root(default_cache_dir())

# Tests run beside nothing else on 2 cores only when told so; keep torch to one thread per process
# so a test spawning workers or DDP ranks does not oversubscribe the machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_configure(config: pytest.Config) -> None:
    if not EMOJI_IS_REAL:
        build_emoji_like(EMOJI)
    os.environ["UNCLIP_EMOJI_ROOT"] = str(EMOJI)


def pytest_report_header(config: pytest.Config) -> str:
    return f"emoji shards: {EMOJI} ({'real' if EMOJI_IS_REAL else 'stand-in from tests/emoji_like.py'})"


def compose_train(overrides: list[str]):
    """Compose conf/train.yaml with overrides (resolvers registered)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture
def emoji_root() -> Path:
    """The emoji-layout shard root of this session (the real set or its stand-in, see EMOJI)."""
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
