"""Feature extractors: the Inception loading path with weights the test makes; FD-CLIP features."""

from __future__ import annotations

import os

import pytest
import torch

from unclip.evaluation.features import InceptionFeatures, to_uint8


def test_inception_features_from_a_local_file(inception_weights):
    extractor = InceptionFeatures(inception_weights)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = extractor(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert torch.equal(extractor(images), feats), "deterministic"
    saved = torch.load(inception_weights, weights_only=True)
    assert torch.equal(extractor.net.state_dict()["fc.weight"], saved["fc.weight"])


def test_inception_refuses_a_weights_file_with_pickled_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch /tmp/unclip_pwned_by_inception",))

    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Exploit()}, path)
    with pytest.raises(ValueError, match="pickled Python objects"):
        InceptionFeatures(path)
    assert not os.path.exists("/tmp/unclip_pwned_by_inception")


def test_uint8_quantisation_matches_png_rounding():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]
