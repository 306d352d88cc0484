"""Fixtures of the evaluation tests: Inception weights made here (the real ones are a download)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A random-weight state dict with the real network's keys and shapes, built without a download."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    return path


def chain_eval_config(config_name: str, chain: dict, out_dir, *overrides: str):
    """conf/<config_name>.yaml composed for the tiny chain and the demo val shards, on the CPU."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR
    from unclip.config import register_resolvers
    from unclip.data.demo_shapes import DemoShapesConfig, ensure_demo_shards

    register_resolvers()
    val = ensure_demo_shards(DemoShapesConfig())["val"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=[
            f"clip_ckpt={chain['clip']}", f"prior_ckpt={chain['prior']}", f"decoder_ckpt={chain['decoder']}",
            f"upsampler_ckpts=[{chain['upsampler']}]", f"val_shards='{val}'", f"out_dir={out_dir}", "device=cpu",
            *overrides])
