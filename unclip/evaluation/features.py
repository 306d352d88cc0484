"""The FID feature extractor: the standard Inception-v3 (CLIP image features come from ``FrozenCLIP.embed_images``).

Inception: torch-fidelity's ``FeatureExtractorInceptionV3``, the TF-ported "pt_inception-2015-12-05"
network of pytorch-fid / torch-fidelity / clean-fid, 2048-d pool3 features. Images are quantised to
uint8 as a saved PNG would be, then resized to 299 with TF1's bilinear recipe inside the extractor —
the resize recipe that the reported FIDs use. Weights come from a local file (``weights_path``), read
with ``torch.load(weights_only=True)``, or are downloaded by torch-fidelity when online.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from unclip.checkpoints import read_checkpoint
from unclip.images import to_uint8

INCEPTION_NAME = "inception-v3-compat"  # torch-fidelity's name for the pt_inception-2015-12-05 network


class InceptionFeatures(nn.Module):
    """2048-d Inception-v3 pool features of [-1, 1] images.

    :param weights_path: local ``pt_inception-2015-12-05`` state dict (.pth); None downloads it through
        torch-fidelity (needs the internet).
    """

    name = "inception-v3 pt_inception-2015-12-05 pool3 (torch-fidelity, TF1 bilinear resize to 299)"

    def __init__(self, weights_path: str | Path | None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,
        )

        if weights_path is None:
            self.net = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"])
            return
        # torch-fidelity reads a path with weights_only=False; we read the user's file safely and hand
        # it a copy that we wrote from tensors alone.
        state = read_checkpoint(weights_path)
        state = state.get("state_dict", state)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "inception.pth"
            torch.save({k: v.clone() for k, v in state.items()}, copy)
            self.net = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=str(copy))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """:param images: [B, 3, H, W] in [-1, 1]. :return: [B, 2048] float32."""
        (features,) = self.net(to_uint8(images))
        return features.float()
