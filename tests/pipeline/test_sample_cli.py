"""unclip-sample end to end on the tiny chain: every mode writes PNGs, grid.png and samples.json; bad configs fail
before anything loads, naming the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.conftest import CONF_DIR
from unclip.config import ConfigError
from unclip.sample import run

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*LeafSpec")


def sample_config(chain, out, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="sample", overrides=[
            f"clip_ckpt={chain['clip']}", f"prior_ckpt={chain['prior']}", f"decoder_ckpt={chain['decoder']}",
            f"upsampler_ckpts=[{chain['upsampler']}]", f"out_dir={out}", "device=cpu", "prior.steps=3",
            "decoder.steps=3", "upsamplers.steps=2", *overrides])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "prompts.txt").write_text("a red circle\n\na blue square\n")
    return folder


@pytest.mark.parametrize("mode, extra, count", [
    ("text", ["num_images=2"], 4),
    ("variations", ["num_images=3"], 3),
    ("interpolate", ["num_images=4", "latents=inverted"], 4),
    ("text_diff", ["from_caption=a red circle", "to_caption=a blue square", "thetas=[0,0.5]"], 2),
    ("edit", ["num_images=1", "jump_length=2", "jump_n_sample=2"], 2),
])
def test_every_mode_writes_pngs_a_grid_and_a_record(tiny_chain, inputs, tmp_path, mode, extra, count):
    cfg = sample_config(tiny_chain, tmp_path, f"mode={mode}", f"prompts_file={inputs / 'prompts.txt'}",
                        f"image={inputs / 'a.png'}", f"image_b={inputs / 'b.png'}", f"mask={inputs / 'mask.png'}",
                        *extra)
    record = run(cfg)
    files = sorted(tmp_path.glob("0*.png"))
    assert len(files) == count and len(record["files"]) == count
    assert (tmp_path / "grid.png").is_file()
    on_disk = json.loads((tmp_path / "samples.json").read_text())
    assert on_disk["mode"] == mode and on_disk["settings"]["decoder"]["steps"] == 3
    if mode in ("text", "edit"):
        assert [f["prompt"] for f in on_disk["files"]][:1] == ["a red circle"]
    if mode == "edit":  # outside the mask, the edit is the input image exactly, at its size
        src, mask = np.asarray(Image.open(inputs / "a.png")), np.asarray(Image.open(inputs / "mask.png")) == 0
        assert np.array_equal(np.asarray(Image.open(files[0]))[mask], src[mask])


def test_bad_configs_fail_before_loading_naming_the_key(tiny_chain, tmp_path):
    with pytest.raises(ConfigError, match="mode=text needs 'prompts' or 'prompts_file'"):
        run(sample_config(tiny_chain, tmp_path))
    with pytest.raises(ConfigError, match="mode=interpolate needs 'image'"):
        run(sample_config(tiny_chain, tmp_path, "mode=interpolate"))
    with pytest.raises(ConfigError, match="mode='paint' is not one of"):
        run(sample_config(tiny_chain, tmp_path, "mode=paint"))
    with pytest.raises(ConfigError, match="mode=text needs 'prior_ckpt'"):
        run(sample_config(tiny_chain, tmp_path, "prior_ckpt=null", "prompts=[a]"))
