"""A checkpoint holding pickled objects is refused at every entry point with one clear message (issue 20): the file,
the global it would have had to unpickle, what the file may be and how to convert it safely, and never torch's own
advice to re-run with ``weights_only=False`` (not even in the chained exceptions a traceback prints)."""

from __future__ import annotations

import argparse
import os
import shutil
import traceback
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_train
from tests.reliability.helpers import MICRO_CLIP, QUICK

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*LeafSpec")

# What torch's UnpicklingError says, and unclip must never repeat.
UNSAFE_ADVICE = ("weights_only=False", "set to `False`", "add_safe_globals", "safe_globals")


def whole_text(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` prints, causes and contexts included."""
    return "".join(traceback.format_exception(exc))


def assert_clear_refusal(text: str, path: Path, global_name: str) -> None:
    assert f"refusing to load {path}" in text, text
    assert global_name in text, text  # the class it would have had to unpickle
    assert "unclip-export" in text and "state_dict()" in text, text  # how to convert it
    for advice in UNSAFE_ADVICE:
        assert advice not in text, f"{advice!r} in: {text}"


@pytest.fixture
def pickled_checkpoint(tmp_path) -> Path:
    """A Lightning-style checkpoint from another program: hyper-parameters as an argparse.Namespace object."""
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"args": argparse.Namespace(lr=0.1)},
                "unclip": {"stage": "decoder"}, "epoch": 0, "global_step": 1}, path)
    return path


def test_read_checkpoint_names_the_global_and_the_way_out(pickled_checkpoint):
    from unclip.checkpoints import UnsafeCheckpointError, read_checkpoint

    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(pickled_checkpoint)
    assert_clear_refusal(whole_text(info.value), pickled_checkpoint, "argparse.Namespace")


def test_a_whole_pickled_model_is_recognised(tmp_path):
    from unclip.checkpoints import UnsafeCheckpointError, read_checkpoint

    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsafeCheckpointError, match="whole pickled model") as info:
        read_checkpoint(path)
    assert_clear_refusal(whole_text(info.value), path, "torch.nn.modules.linear.Linear")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))  # torch words this refusal differently ("blocked" module)


def test_a_payload_calling_a_function_is_named(tmp_path):
    from unclip.checkpoints import UnsafeCheckpointError, read_checkpoint

    path = tmp_path / "payload.pt"
    torch.save({"w": RunsCode()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert_clear_refusal(whole_text(info.value), path, f"{os.system.__module__}.system")


def test_a_file_that_is_no_checkpoint_is_not_called_pickled(tmp_path):
    from unclip.checkpoints import read_checkpoint

    path = tmp_path / "noise.ckpt"
    path.write_bytes(b"not a checkpoint at all" * 8)
    with pytest.raises(ValueError, match=r"noise.ckpt.*not a PyTorch checkpoint") as info:
        read_checkpoint(path)
    for advice in UNSAFE_ADVICE:
        assert advice not in whole_text(info.value)


def test_unclip_train_resume_refuses_clearly(pickled_checkpoint, emoji_root, tmp_path):
    from unclip.training.runner import train

    cfg = compose_train([*MICRO_CLIP, *QUICK, f"run_dir={tmp_path / 'run'}", f"resume={pickled_checkpoint}",
                         "trainer.max_steps=1"])
    with pytest.raises(ValueError) as info:
        train(cfg)
    assert_clear_refusal(whole_text(info.value), pickled_checkpoint, "argparse.Namespace")


def test_unclip_train_init_from_refuses_clearly(pickled_checkpoint, tiny_clip_export, tmp_path):
    from unclip.config import ConfigError
    from unclip.training.runner import train

    cfg = compose_train(["stage=decoder", "experiment=emoji_inpaint_decoder_tiny", f"clip_ckpt={tiny_clip_export}",
                         f"module.init_from={pickled_checkpoint}", f"run_dir={tmp_path / 'run'}", "logger=none"])
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert_clear_refusal(whole_text(info.value), pickled_checkpoint, "argparse.Namespace")


@pytest.mark.parametrize("part", ["clip", "decoder", "prior", "upsampler"])
def test_pipeline_from_checkpoints_refuses_clearly(part, pickled_checkpoint, tiny_chain):
    from unclip.pipeline import UnCLIPPipeline

    paths = {**tiny_chain, part: pickled_checkpoint}
    with pytest.raises(ValueError) as info:
        UnCLIPPipeline.from_checkpoints(paths["clip"], paths["decoder"], paths["prior"], [paths["upsampler"]],
                                        device="cpu")
    assert_clear_refusal(whole_text(info.value), pickled_checkpoint, "argparse.Namespace")


def test_a_clip_weights_file_refuses_clearly(pickled_checkpoint, tiny_clip_export, tmp_path):
    """A CLIP folder's weights (open_clip's hub layout) go through open_clip's loader, not read_checkpoint."""
    from unclip.models.clip import load_clip

    folder = tmp_path / "hub_clip"
    folder.mkdir()
    shutil.copy(tiny_clip_export / "open_clip_config.json", folder)
    weights = shutil.copy(pickled_checkpoint, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError) as info:
        load_clip(folder)
    assert_clear_refusal(whole_text(info.value), weights, "argparse.Namespace")


@pytest.mark.parametrize("chain", [False, True])
def test_unclip_export_refuses_clearly(chain, pickled_checkpoint, tiny_chain, tmp_path, capsys):
    from unclip.export import main

    argv = ([str(tmp_path / "out"), "--chain", "--clip", str(tiny_chain["clip"]), "--decoder",
             str(pickled_checkpoint)] if chain else [str(pickled_checkpoint), str(tmp_path / "out")])
    assert main(argv) == 1
    assert_clear_refusal(capsys.readouterr().err, pickled_checkpoint, "argparse.Namespace")
    assert not (tmp_path / "out").exists()
