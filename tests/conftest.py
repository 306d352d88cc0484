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
