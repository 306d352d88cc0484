"""The guard of the stage contract: today's (format 0) checkpoints still load, and their networks still compute the
golden numbers recorded before the redesign (tests/golden/make_golden.py, fixed seeds, 1e-4 relative)."""

from __future__ import annotations

import pytest

from tests.golden.formats import STAGES, assert_close_to_golden, golden_outputs, read_format, rebuild_checkpoint
from unclip.decoder_sampling import load_decoder, load_upsampler
from unclip.models.prior_sampling import load_prior

LOADERS = {"prior": load_prior, "decoder": load_decoder, "upsampler": load_upsampler, "inpaint": load_decoder}


@pytest.mark.parametrize("stage", STAGES)
def test_format_0_checkpoint_loads_and_matches_the_golden_outputs(stage, tmp_path):
    net, meta = LOADERS[stage](rebuild_checkpoint(stage, tmp_path / f"{stage}.ckpt"))
    assert_close_to_golden(golden_outputs(stage, net, meta), read_format(stage)["golden"])


def test_the_golden_comparison_catches_a_changed_weight(tmp_path):
    path = rebuild_checkpoint("upsampler", tmp_path / "up.ckpt")
    net, meta = load_upsampler(path)
    next(net.parameters()).data.mul_(1.01)
    with pytest.raises(AssertionError, match="golden"):
        assert_close_to_golden(golden_outputs("upsampler", net, meta), read_format("upsampler")["golden"])
