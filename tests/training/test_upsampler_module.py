"""Stage ``upsampler`` built from the real configs: chain and size checks before compute, training pairs (crops,
corruption, noise augmentation), a short run through the runner, and sampling larger than trained."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import compose_train
from tests.golden.formats import format_0_meta, metadata_checkpoint
from unclip.config import ConfigError
from unclip.decoder_sampling import edit_upsampler, load_upsampler, sample_upsampler, sampling_process
from unclip.models.degradations import downsample, upsample
from unclip.models.unet import SuperResUNet
from unclip.stages import UpsamplerInfo
from unclip.training.runner import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*LeafSpec")
MICRO = ["model.model_channels=16", "model.num_res_blocks=1", "model.num_groups=8"]
SHORT = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "data.batch_size=4",
         "data.num_workers=0", "callbacks.checkpoint.every_n_train_steps=3", "trainer.enable_progress_bar=false",
         "logger=csv", "module.val_samples.num=2", "module.sampling.steps=3"]


def module_from(*overrides: str):
    cfg = compose_train(["stage=upsampler", "data=emoji", "run_dir=null", *MICRO, *overrides])
    OmegaConf.resolve(cfg)
    torch.manual_seed(0)
    try:
        return instantiate(cfg.module, _recursive_=False)
    except InstantiationException as exc:  # the constructor's own error, as the runner reports it
        raise exc.__cause__ from None


def test_input_size_must_match_the_previous_stage_naming_both_sizes(tmp_path, emoji_root):
    decoder = tmp_path / "decoder.ckpt"
    metadata_checkpoint(decoder, format_0_meta("decoder", image_size=32))
    cfg = compose_train(["stage=upsampler", "data=emoji", f"run_dir={tmp_path}", f"decoder_ckpt={decoder}",
                         "model.image_size=128", "module.input_size=64", *MICRO, *SHORT])
    with pytest.raises(ConfigError, match=r"module.input_size=64 must be equal to the output size=32 of "
                                          r"decoder_ckpt=.*decoder.ckpt"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()
    first = tmp_path / "up.ckpt"
    metadata_checkpoint(first, format_0_meta("upsampler", image_size=256))
    with pytest.raises(ConfigError, match=r"input_size=64 must be equal to the output size=256 of "
                                          r"upsampler_ckpts\[0\]=.*up.ckpt"):
        module_from(f"decoder_ckpt={decoder}", f"upsampler_ckpts=[{first}]", "model.image_size=128",
                    "module.input_size=64")
    with pytest.raises(ValueError, match="is a 'prior' stage checkpoint; a 'decoder' checkpoint is needed"):
        torch.save({"unclip": {"stage": "prior"}, "state_dict": {}}, tmp_path / "prior.ckpt")
        module_from(f"decoder_ckpt={tmp_path / 'prior.ckpt'}")
    module_from(f"decoder_ckpt={decoder}")  # 32 -> 64 matches


@pytest.mark.parametrize("overrides, message", [
    (["module.input_size=64"], "module.input_size=64 must be smaller than model.image_size=64"),
    (["module.crop_fraction=0.3"], r"crop_fraction=0.3 gives 19px crops of 64px images"),
    (["model.noise_aug=false", "module.noise_aug_max_level=0.2"], "noise_aug_max_level=0.2 needs model.noise_aug"),
    (["+model.attention=true"], r"unknown keys \['attention'\]"),
])
def test_bad_upsampler_configs_fail_at_construction(overrides, message):
    with pytest.raises(ConfigError, match=message):
        module_from(*overrides)


def test_training_pairs_are_aligned_crops_of_the_target_and_its_corrupted_low_res():
    module = module_from("degradation@module.degradation=none", "module.noise_aug_max_level=0.0",
                         "model.noise_aug=false", "module.crop_fraction=0.5")
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8, generator=g), size=64, mode="bilinear") * 2 - 1
    target, kwargs = module.training_inputs({"image": image})
    assert target.shape == (3, 3, 32, 32) and kwargs["low_res"].shape == (3, 3, 32, 32) and "aug_level" not in kwargs
    full = upsample(downsample(image, 32), 64)
    for i in range(3):  # find each crop's window in the full-size pair: the same for target and low-res
        hits = [(y, x) for y in range(33) for x in range(33)
                if torch.equal(image[i, :, y:y + 32, x:x + 32], target[i])]
        (y, x), = hits
        torch.testing.assert_close(kwargs["low_res"][i], full[i, :, y:y + 32, x:x + 32])
    blurred = module_from("module.noise_aug_max_level=0.2", "module.crop_fraction=1.0")
    target, kwargs = blurred.training_inputs({"image": image})
    assert target.shape == (3, 3, 64, 64) and kwargs["aug_level"].shape == (3,)
    assert 0 <= float(kwargs["aug_level"].min()) and float(kwargs["aug_level"].max()) <= 0.2
    assert not torch.allclose(kwargs["low_res"], full, atol=1e-3)  # blurred and noised


def test_upsampler_trains_through_the_runner_and_samples_larger_than_trained(emoji_root, tmp_path):
    cfg = compose_train(["stage=upsampler", "data=emoji", f"run_dir={tmp_path}", *MICRO, *SHORT,
                         "module.noise_aug_max_level=0.2", "module.sampling.noise_aug_level=0.1"])
    out = train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/loss", "val/psnr", "val/psnr_bicubic"} <= metrics.keys()
    grid = Image.open(tmp_path / "samples" / "step00000003.png")
    assert grid.size == (2 * 65 + 1, 3 * 65 + 1)  # 2 columns; bicubic, sample and target rows
    net, meta = load_upsampler(out["last_checkpoint"])
    assert isinstance(net, SuperResUNet) and meta.stage == "upsampler"
    assert (meta.input_size, meta.image_size, meta.training["crop_size"]) == (32, 64, 32)
    assert meta.training["degradation"]["_target_"].endswith("GaussianBlur") and meta.diffusion["mean_type"] == "eps"
    low = torch.rand(2, 3, 48, 40) * 2 - 1  # larger than the 32px it was trained for, and not square
    high = sample_upsampler(net, meta, low, generator=torch.Generator().manual_seed(0))
    assert high.shape == (2, 3, 96, 80) and high.abs().max() <= 1
    with pytest.raises(ValueError, match="not divisible by 8"):
        sample_upsampler(net, meta, torch.zeros(1, 3, 30, 30))


def test_resume_restores_the_ema_made_in_setup(emoji_root, tmp_path):
    base = ["stage=upsampler", "data=emoji", f"run_dir={tmp_path}", *MICRO, *SHORT]
    train(compose_train(base))
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(first["ema.n_averaged"]) == 3
    train(compose_train([*base, "resume=true", "trainer.max_steps=5"]))
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(second["ema.n_averaged"]) == 5, "the EMA continued from the checkpoint, not from a fresh copy"


# ---- residual upsampler (SRDiff): x0 = target - conditioning image; samples = conditioning image + residual ----

def test_a_fresh_residual_upsampler_samples_and_edits_exactly_the_bicubic_upsample():
    # x0 prediction: the zero-initialised output conv predicts a zero residual at every step (v or eps would not)
    residual = module_from("module.residual=true", "module.diffusion.mean_type=x0")
    info = residual.stage_info()
    assert info.residual and UpsamplerInfo.from_meta(info.to_meta()).residual
    g = torch.Generator().manual_seed(0)
    low = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    bicubic = upsample(low, 64).clamp(-1, 1)  # bicubic overshoots [-1, 1]; samples are clamped
    net = residual.net.eval()
    for steps in (1, 3):
        out = sample_upsampler(net, info, low, sampler="ddim", eta=0.0, steps=steps, generator=g)
        assert torch.equal(out, bicubic)
    known, mask = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.zeros(2, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    edit = edit_upsampler(net, info, low, known, mask, sampler="ddim", steps=3, generator=g)
    assert torch.equal(edit.raw, bicubic)
    plain = module_from("module.diffusion.mean_type=x0")  # the same network diffusing the image: all zeros
    out = sample_upsampler(plain.net.eval(), plain.stage_info(), low, sampler="ddim", steps=3, generator=g)
    assert not plain.stage_info().residual and out.abs().max() < 1e-6


def test_residual_training_and_validation_target_is_the_target_minus_the_conditioning_image():
    module = module_from("module.residual=true", "module.noise_aug_max_level=0.2", "module.crop_fraction=1.0")
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8, generator=g), size=64, mode="bilinear") * 2 - 1
    for x0, kwargs in (module.training_inputs({"image": image}), module.validation_inputs({"image": image}, g)):
        cond = kwargs["low_res"]  # blurred (and noised in training), as the network sees it
        assert not torch.allclose(cond, image, atol=1e-2)
        torch.testing.assert_close(x0, image - cond, rtol=0, atol=0)
    plain = module_from("module.noise_aug_max_level=0.2", "module.crop_fraction=1.0")
    assert torch.equal(plain.training_inputs({"image": image})[0], image)


@pytest.fixture(scope="module")
def residual_checkpoint(tmp_path_factory) -> str:
    """A checkpoint written by a 3-step residual run (x0 prediction) through the runner."""
    run_dir = tmp_path_factory.mktemp("residual_run")
    out = train(compose_train(["stage=upsampler", "data=emoji", f"run_dir={run_dir}", *MICRO, *SHORT,
                               "module.residual=true", "module.diffusion.mean_type=x0"]))
    return str(out["last_checkpoint"])


def _one_step_reference(net: SuperResUNet, meta, low: torch.Tensor, noise: torch.Tensor, residual: bool):
    """One DDIM step of an x0 predictor from ``noise``: its prediction (plus the upsampled input if residual)."""
    cond = upsample(low, 64)
    t = sampling_process(meta.diffusion, 1, "strided").timestep_map[0]
    pred = net(noise, torch.full((low.shape[0],), int(t)), cond, aug_level=torch.zeros(low.shape[0]))
    return ((cond if residual else 0) + pred).clamp(-1, 1)


def _perturbed(net: SuperResUNet) -> SuperResUNet:
    with torch.no_grad():  # a non-zero output conv, so the prediction is not the zero residual
        net.out_conv.weight.copy_(torch.randn(net.out_conv.weight.shape, generator=torch.Generator().manual_seed(3)))
    return net


def test_the_residual_flag_round_trips_through_a_checkpoint_into_sample_upsampler(residual_checkpoint):
    net, meta = load_upsampler(residual_checkpoint)
    assert meta.residual and meta.diffusion["mean_type"] == "x0"
    net = _perturbed(net)
    g = torch.Generator().manual_seed(0)
    low, noise = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 3, 64, 64, generator=g)
    out = sample_upsampler(net, meta, low, sampler="ddim", steps=1, noise=noise)
    torch.testing.assert_close(out, _one_step_reference(net, meta, low, noise, residual=True), atol=1e-5, rtol=0)


def test_a_checkpoint_without_the_residual_key_loads_and_samples_as_a_plain_upsampler(residual_checkpoint, tmp_path):
    checkpoint = torch.load(residual_checkpoint, weights_only=True)
    del checkpoint["unclip"]["residual"]  # what checkpoints written before the option hold
    torch.save(checkpoint, tmp_path / "old.ckpt")
    net, meta = load_upsampler(tmp_path / "old.ckpt")
    assert not meta.residual
    net = _perturbed(net)
    g = torch.Generator().manual_seed(0)
    low, noise = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 3, 64, 64, generator=g)
    out = sample_upsampler(net, meta, low, sampler="ddim", steps=1, noise=noise)
    torch.testing.assert_close(out, _one_step_reference(net, meta, low, noise, residual=False), atol=1e-5, rtol=0)
