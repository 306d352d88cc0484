"""Reference statistics: the real side of an evaluation, computed once and exchanged as a ``.npz`` file.

One file per feature extractor. Its arrays are pytorch-fid's ``mu`` [D] and ``sigma`` [D, D] (float64), so
pytorch-fid and torch-fidelity users can read ours and we read theirs, plus what KID and precision/recall need
and the Fréchet statistics do not hold:

* ``features`` [N, D] float32: the per-image features (optional: a pytorch-fid file has none, and then KID and
  precision/recall are reported null with a note);
* ``meta``: a JSON string (a 0-d unicode array, readable with ``allow_pickle=False``) naming the extractor, N,
  image size, resize recipe and the source of the images.

The report names the file by a fingerprint of its mu and sigma, so two reports against the same statistics can
be seen to be comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unclip.evaluation.metrics import feature_statistics


@dataclass
class Reference:
    """:param mu: [D] float64. :param sigma: [D, D] float64. :param features: [N, D] float32 or None.
    :param meta: what made it (extractor, num_samples, image_size, resize, source). :param path: the file."""

    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    path: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of mu and sigma as float64 bytes: equal statistics, equal fingerprint."""
        h = hashlib.sha256(np.ascontiguousarray(self.mu, np.float64).tobytes())
        h.update(np.ascontiguousarray(self.sigma, np.float64).tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def from_features(cls, features: torch.Tensor, meta: dict) -> Reference:
        """Statistics of [N, D] features, keeping the features for KID and precision/recall."""
        mu, sigma = feature_statistics(features)
        return cls(mu, sigma, features.detach().float().cpu(), {**meta, "num_samples": int(features.shape[0])})

    def describe(self) -> dict:
        """The report's ``reference`` entry."""
        return {"path": self.path, "fingerprint": self.fingerprint, "has_features": self.features is not None,
                **{k: self.meta.get(k) for k in ("extractor", "num_samples", "image_size", "resize", "source")}}


def save_reference(path: str | Path, ref: Reference) -> Path:
    """Write ``ref`` to ``path`` (.npz, atomically).

    :return: the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": np.asarray(ref.mu, np.float64), "sigma": np.asarray(ref.sigma, np.float64),
              "meta": np.array(json.dumps(ref.meta, sort_keys=True))}
    if ref.features is not None:
        arrays["features"] = ref.features.float().cpu().numpy()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz.tmp", delete=False) as tmp:
        np.savez(tmp, allow_pickle=False, **arrays)  # what load reads: no object arrays
    os.replace(tmp.name, path)
    return path


def load_reference(path: str | Path, extractor: str | None = None) -> Reference:
    """Read a reference ``.npz`` (ours or pytorch-fid's ``mu``/``sigma``), never unpickling anything.

    :param extractor: when given and the file names its extractor, they must match (FID between features of two
        different networks is meaningless); a pytorch-fid file names none and is taken on trust.
    :raises FileNotFoundError, ValueError: naming the file and the missing key or the mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} do not exist")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"reference statistics {path} lack {missing} (found {f.files})")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        features = torch.from_numpy(f["features"]).float() if "features" in f.files else None
        meta = json.loads(str(f["meta"])) if "meta" in f.files else {"source": "mu/sigma only (pytorch-fid format)"}
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference statistics {path}: mu {mu.shape} and sigma {sigma.shape} do not fit")
    if features is not None and features.shape[1] != mu.shape[0]:
        raise ValueError(f"reference statistics {path}: features {tuple(features.shape)} vs mu {mu.shape}")
    if extractor is not None and meta.get("extractor") not in (None, extractor):
        raise ValueError(f"reference statistics {path} were computed with {meta['extractor']!r}, but this "
                         f"evaluation uses {extractor!r}")
    return Reference(mu, sigma, features, meta, str(path))
