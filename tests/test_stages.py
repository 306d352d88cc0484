"""The typed stage contract (unclip.stages): format-0 metadata converts on read, descriptions round-trip through
``checkpoint["unclip"]``, newer formats and incomplete metadata are refused by name, and the CLIP facts read the
same from every source."""

from __future__ import annotations

import dataclasses

import pytest

from tests.golden.formats import format_0_meta, metadata_checkpoint, rebuild_checkpoint
from unclip.stages import (
    FORMAT_VERSION,
    PRIOR_SAMPLING,
    ClipInfo,
    ContractError,
    DecoderInfo,
    PriorInfo,
    UpsamplerInfo,
    read_stage,
    stage_info,
)

INFOS = {"prior": PriorInfo, "decoder": DecoderInfo, "upsampler": UpsamplerInfo, "inpaint": DecoderInfo}


@pytest.mark.parametrize("recorded", list(INFOS))
def test_format_0_converts_and_the_description_round_trips(recorded, tmp_path):
    meta = format_0_meta(recorded)
    info = INFOS[recorded].from_meta(meta)
    assert info.model == meta["model_config"] and info.diffusion == meta["diffusion"]
    assert info.provenance == {"version": meta["version"], "git_commit": meta["git_commit"]}
    again = stage_info(info.to_meta())
    assert again == info and type(again) is type(info)
    assert again.to_meta()["format_version"] == FORMAT_VERSION
    # ...also through a checkpoint file, and the metadata of a checkpoint with weights reads the same.
    assert read_stage(metadata_checkpoint(tmp_path / "new.ckpt", info.to_meta()), info.stage) == info
    assert read_stage(rebuild_checkpoint(recorded, tmp_path / "old.ckpt"), info.stage) == info


def test_format_0_facts_land_in_their_typed_fields():
    prior = PriorInfo.from_meta(format_0_meta("prior"))
    recorded = format_0_meta("prior")
    assert prior.sampling == PRIOR_SAMPLING, "format 0 recorded no prior sampling: sample_prior's defaults"
    assert prior.clip == ClipInfo(embed_dim=recorded["embed_dim"], text_width=recorded["text_width"],
                                  context_length=recorded["clip_context_length"], clip_hash=recorded["clip_hash"])
    assert prior.embed_scale == recorded["embed_scale"]
    decoder = DecoderInfo.from_meta(format_0_meta("decoder"))
    assert decoder.image_size == 16 and decoder.clip.clip_hash == format_0_meta("decoder")["clip_hash"]
    assert decoder.text_conditioning and not decoder.inpaint
    old = format_0_meta("decoder")
    del old["model_config"]["inpaint"]  # checkpoints from before inpainting decoders existed
    assert DecoderInfo.from_meta(old).model["inpaint"] is False
    inpaint = DecoderInfo.from_meta(format_0_meta("inpaint"))
    assert inpaint.inpaint and set(inpaint.training) == {"init_from", "masks"}
    up = UpsamplerInfo.from_meta(format_0_meta("upsampler"))
    assert (up.input_size, up.image_size, up.output_size(24, 16)) == (16, 32, (48, 32))
    assert set(up.training) == {"crop_size", "degradation"}


def test_a_newer_format_and_incomplete_metadata_are_refused_by_name(tmp_path):
    meta = {**DecoderInfo.from_meta(format_0_meta("decoder")).to_meta(), "format_version": FORMAT_VERSION + 1}
    path = metadata_checkpoint(tmp_path / "future.ckpt", meta)
    with pytest.raises(ContractError, match=rf"future.ckpt has stage format {FORMAT_VERSION + 1}, newer than the "
                                            rf"{FORMAT_VERSION} this unclip reads: upgrade unclip"):
        DecoderInfo.read(path)
    partial = {k: v for k, v in format_0_meta("upsampler").items() if k != "input_size"}
    with pytest.raises(ContractError, match="up.ckpt: the upsampler stage metadata \\(format 0\\) lacks 'input_size'"):
        UpsamplerInfo.read(metadata_checkpoint(tmp_path / "up.ckpt", partial))
    with pytest.raises(ContractError, match="is a 'decoder' stage checkpoint; a 'prior' checkpoint is needed"):
        read_stage(metadata_checkpoint(tmp_path / "d.ckpt", format_0_meta("decoder")), "prior")


def test_clip_info_reads_every_source_the_same_and_fills_open_clips_default_context():
    export = {"embed_dim": 128, "image_size": 64, "arch": None, "clip_hash": "h" * 64, "image_mean": [0.5] * 3,
              "image_std": [0.25] * 3, "context_length": 32,
              "open_clip_config": {"embed_dim": 128, "text_cfg": {"width": 96, "context_length": 32}}}
    info = ClipInfo.from_meta(export)
    assert (info.embed_dim, info.text_width, info.context_length, info.image_size) == (128, 96, 32, 64)
    assert ClipInfo.from_meta(info.to_dict()) == info  # e.g. recorded inside a stage's metadata
    embeddings = {"embed_dim": 128, "text_width": 96, "context_length": 32, "clip_hash": "h" * 64}
    assert ClipInfo.from_meta(embeddings) == dataclasses.replace(info, image_size=None, image_mean=None,
                                                                  image_std=None)
    no_context = {**export, "context_length": None, "open_clip_config": {"text_cfg": {"width": 96}}}
    assert ClipInfo.from_meta(no_context).context_length == 77
    assert info.disagreement(dataclasses.replace(info, clip_hash="x")) == ("clip_hash", "h" * 64, "x")
    assert info.disagreement(dataclasses.replace(info, image_size=32)) is None


def test_the_stage_base_is_abstract():
    """Only a concrete stage (prior, decoder, upsampler) can be described: each builds and converts its own."""
    from unclip.stages import StageInfo

    with pytest.raises(TypeError, match="abstract"):
        StageInfo(model={}, diffusion={}, sampling={})  # type: ignore[abstract]
