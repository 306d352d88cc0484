"""The explicit checks that replaced unchecked assumptions (found by the type checker): each raises a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from torch import nn

from unclip.config import ConfigError
from unclip.models.clip import model_context_length
from unclip.training.callbacks import rng_state
from unclip.training.preflight import check_shards


def test_a_shard_spec_that_is_a_mapping_is_refused_by_name():
    cfg = OmegaConf.create({"data": {"train_shards": {"a": "x.tar"}}})
    with pytest.raises(ConfigError, match=r"data.train_shards must be a shard pattern or a list of them, got dict"):
        check_shards(cfg)


def test_rng_state_refuses_a_replaced_numpy_generator():
    original = np.random.get_bit_generator()
    np.random.set_bit_generator(np.random.PCG64(0))  # get_state() is then a dict, not the MT19937 tuple
    try:
        with pytest.raises(TypeError, match="not the legacy MT19937 RandomState"):
            rng_state()
    finally:
        np.random.set_bit_generator(original)
    assert isinstance(rng_state()["numpy"]["pos"], int)


def test_model_context_length_needs_an_open_clip_model():
    with pytest.raises(TypeError, match="Linear has no integer context_length"):
        model_context_length(nn.Linear(2, 2))
    model = nn.Linear(2, 2)
    model.context_length = 77  # open_clip's CLIP holds it as a plain attribute
    assert model_context_length(model) == 77
