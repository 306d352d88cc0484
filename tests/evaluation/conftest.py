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
