"""Pretrained folders: unclip-export, UnCLIPPipeline.save_pretrained / from_pretrained, and their refusals."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import ROOT, make_tiny_clip_export
from unclip.chain import ChainError
from unclip.export import export_checkpoint, main
from unclip.pipeline import UnCLIPPipeline
from unclip.pretrained import (
    CARD_FILE,
    CONFIG_FILE,
    PIPELINE_FILE,
    WEIGHTS_FILE,
    PretrainedError,
    load_stage,
    read_stage,
    save_stage,
)
from unclip.stages import PriorInfo, network_weights

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*LeafSpec")
PROMPTS = ["a red circle", "a blue square"]
FAST = {"prior": {"steps": 8}}  # the prior samples 64 steps by default


@pytest.fixture(scope="module")
def trained(tiny_chain, tmp_path_factory) -> dict[str, Path]:
    """The tiny chain with non-zero EMA weights where the fresh networks are zero-initialised (so sampling depends
    on every weight), the prior inside a run folder with metrics.json and config.yaml, and a global_step."""
    root = tmp_path_factory.mktemp("trained")
    g = torch.Generator().manual_seed(0)
    out = {"clip": tiny_chain["clip"]}
    for name in ("prior", "decoder", "upsampler"):
        ckpt = torch.load(tiny_chain[name], weights_only=True)
        for key, value in ckpt["state_dict"].items():
            if key.startswith("ema.module.") and value.is_floating_point() and not value.any():
                ckpt["state_dict"][key] = torch.randn(value.shape, generator=g) * 0.02
        run = root / name
        (run / "checkpoints").mkdir(parents=True)
        out[name] = run / "checkpoints" / "last.ckpt"
        torch.save({**ckpt, "global_step": 1234, "epoch": 5}, out[name])
    (root / "prior" / "metrics.json").write_text(json.dumps({"val/loss": 0.25, "global_step": 1234}))
    (root / "prior" / "config.yaml").write_text("data:\n  train_shards: shards/{00000..00009}.tar\n")
    return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """``unclip-export --chain`` of the trained chain (float32)."""
    out = tmp_path_factory.mktemp("exported") / "chain"
    assert main(["--chain", str(out), "--clip", str(trained["clip"]), "--prior", str(trained["prior"]),
                 "--decoder", str(trained["decoder"]), "--upsamplers", str(trained["upsampler"])]) == 0
    return out


def test_each_stage_exports_its_ema_weights_config_and_card(trained, tmp_path):
    for name in ("prior", "decoder", "upsampler"):
        result = export_checkpoint(trained[name], tmp_path / name)
        folder = tmp_path / name
        assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, CARD_FILE])
        config = json.loads((folder / CONFIG_FILE).read_text())
        assert config["stage"] == name == result["stage"] and config["dtype"] == "float32"
        assert result["weights_from"] == "ema.module"
        ema, _ = network_weights(torch.load(trained[name], weights_only=True)["state_dict"])
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            assert json.loads(f.metadata()["unclip"]) == config  # the weight file describes itself
            assert set(f.keys()) == set(ema)
            for key in ema:
                assert torch.equal(f.get_tensor(key), ema[key]), key
        assert result["parameters"] == sum(t.numel() for t in ema.values())
        card = (folder / CARD_FILE).read_text()
        assert f"| parameters | {result['parameters']:,} |" in card and "| trained steps | 1234 |" in card
        assert config["clip"] is None or config["clip"]["clip_hash"] in card
        assert "| weights | EMA, stored as float32 |" in card
        net, info = load_stage(folder, name)
        assert info.to_meta() == {k: v for k, v in config.items() if k not in ("export_format", "dtype", "trained")}
        assert all(torch.equal(v, ema[k]) for k, v in net.state_dict().items())
    prior_card = (tmp_path / "prior" / CARD_FILE).read_text()
    assert "| val/loss | 0.25 |" in prior_card and "shards/{00000..00009}.tar" in prior_card


def test_from_pretrained_samples_the_same_images_as_from_checkpoints(trained, exported, monkeypatch):
    assert not list(exported.rglob("*.ckpt"))
    reference = UnCLIPPipeline.from_checkpoints(clip=trained["clip"], prior=trained["prior"],
                                                decoder=trained["decoder"], upsamplers=[trained["upsampler"]],
                                                device="cpu")
    expected = reference(PROMPTS, seed=3, output_type="pt", **FAST)

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained unpickled something")

    for module, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    pipe = UnCLIPPipeline.from_pretrained(exported, device="cpu")
    monkeypatch.undo()
    got = pipe(PROMPTS, seed=3, output_type="pt", **FAST)
    assert got.images.shape == (2, 3, 32, 32) and got.images.std() > 0.01
    assert torch.equal(got.image_embeds, expected.image_embeds) and torch.equal(got.images, expected.images)
    # a pipeline saved again from the folders is the same pipeline, card facts kept
    again = pipe.save_pretrained(exported.parent / "again")
    assert json.loads((again / "prior" / CONFIG_FILE).read_text())["trained"]["steps"] == 1234
    out = UnCLIPPipeline.from_pretrained(again, device="cpu")(PROMPTS, seed=3, output_type="pt",
                                                               **FAST)
    assert torch.equal(out.images, expected.images)


def test_bf16_export_stores_bf16_and_loads_float32_close_to_the_float32_chain(trained, exported, tmp_path):
    out = tmp_path / "bf16"
    assert main(["--chain", str(out), "--clip", str(trained["clip"]), "--prior", str(trained["prior"]),
                 "--decoder", str(trained["decoder"]), "--upsamplers", str(trained["upsampler"]),
                 "--dtype", "bf16"]) == 0
    with safe_open(str(out / "decoder" / WEIGHTS_FILE), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with safe_open(str(out / "clip" / "open_clip_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # the CLIP keeps its hash
    size = (out / "decoder" / WEIGHTS_FILE).stat().st_size
    assert size < 0.6 * (exported / "decoder" / WEIGHTS_FILE).stat().st_size
    half = UnCLIPPipeline.from_pretrained(out, device="cpu")
    assert {p.dtype for p in half.chain.decoder.net.parameters()} == {torch.float32}
    full = UnCLIPPipeline.from_pretrained(exported, device="cpu")
    z = torch.nn.functional.normalize(torch.randn(2, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    a = full.decode(z, None, torch.Generator().manual_seed(1))
    b = half.decode(z, None, torch.Generator().manual_seed(1))
    assert not torch.equal(a, b) and (a - b).abs().mean() < 0.02
    za = full(PROMPTS, seed=0, output_type="pt", **FAST).image_embeds
    zb = half(PROMPTS, seed=0, output_type="pt", **FAST).image_embeds
    assert not torch.equal(za, zb) and torch.nn.functional.cosine_similarity(za, zb).min() > 0.99


def test_a_stage_folder_of_another_stage_without_weights_or_with_a_field_missing_is_refused(exported, tmp_path):
    with pytest.raises(PretrainedError, match=r"prior/config.json: stage='prior', but a 'decoder' folder"):
        load_stage(exported / "prior", "decoder")
    bad = tmp_path / "chain"
    shutil.copytree(exported, bad)
    manifest = json.loads((bad / PIPELINE_FILE).read_text())
    (bad / PIPELINE_FILE).write_text(json.dumps({**manifest, "decoder": "prior"}))
    with pytest.raises(PretrainedError, match=r"prior/config.json: stage='prior', but a 'decoder' folder"):
        UnCLIPPipeline.from_pretrained(bad, device="cpu")
    (bad / PIPELINE_FILE).write_text(json.dumps({k: v for k, v in manifest.items() if k != "decoder"}))
    with pytest.raises(PretrainedError, match=r"pipeline.json: field 'decoder' must be a str, got None"):
        UnCLIPPipeline.from_pretrained(bad, device="cpu")
    with pytest.raises(PretrainedError, match=r"is a 'decoder' stage folder, not a pipeline folder"):
        UnCLIPPipeline.from_pretrained(exported / "decoder", device="cpu")

    folder = tmp_path / "decoder"
    shutil.copytree(exported / "decoder", folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({k: v for k, v in config.items() if k != "model_config"}))
    with pytest.raises(PretrainedError, match=r"decoder/config.json: the decoder stage metadata .* lacks "
                                              r"'model_config'"):
        load_stage(folder, "decoder")
    (folder / CONFIG_FILE).write_text(json.dumps({k: v for k, v in config.items() if k != "dtype"}))
    with pytest.raises(PretrainedError, match=r"decoder/config.json: no 'dtype' field"):
        load_stage(folder, "decoder")
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    shutil.copy(exported / "prior" / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    with pytest.raises(PretrainedError, match=r"decoder/model.safetensors holds 'prior' weights, but .*config.json "
                                              r"says stage='decoder'"):
        load_stage(folder, "decoder")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(PretrainedError, match=r"decoder: config.json but no model.safetensors"):
        load_stage(folder, "decoder")
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(PretrainedError, match=r"decoder: no config.json"):
        read_stage(folder, "decoder")


def test_weights_that_do_not_fit_the_config_are_refused_before_anything_is_written(exported, tmp_path):
    net, info = load_stage(exported / "prior", "prior")
    weights = dict(net.state_dict())
    weights.pop(next(iter(weights)))
    with pytest.raises(PretrainedError, match=r"the weights being exported do not fit the prior network .*Missing"):
        save_stage(weights, info, tmp_path / "prior")
    assert not (tmp_path / "prior").exists()
    assert isinstance(info, PriorInfo)


def test_a_chain_on_another_clip_is_refused_with_the_from_checkpoints_message(trained, exported, tmp_path):
    other = make_tiny_clip_export(tmp_path / "other_clip", seed=1)
    with pytest.raises(ChainError) as from_ckpt:
        UnCLIPPipeline.from_checkpoints(clip=other, prior=trained["prior"], decoder=trained["decoder"], device="cpu")
    bad = tmp_path / "chain"
    shutil.copytree(exported, bad)
    shutil.rmtree(bad / "clip")
    shutil.copytree(other, bad / "clip")
    with pytest.raises(ChainError, match=r"the prior .*chain/prior: clip_hash=\w+ must be equal to the clip_hash="
                                         r"\w+ of the CLIP .*chain/clip") as from_folder:
        UnCLIPPipeline.from_pretrained(bad, device="cpu")
    assert (str(from_ckpt.value).replace(str(trained["prior"]), "PRIOR").replace(str(other), "CLIP")
            == str(from_folder.value).replace(str(bad / "prior"), "PRIOR").replace(str(bad / "clip"), "CLIP"))


def test_cli_refuses_bad_inputs_with_the_file_named(trained, tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    torch.save({"state_dict": {}}, junk)
    assert main([str(junk), str(tmp_path / "out")]) == 1
    assert f"{junk} is not an unclip checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 1
    assert "missing.ckpt: no such checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(trained["prior"]), str(tmp_path / "out"), "--decoder", str(trained["decoder"])])
    assert "--decoder needs --chain" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(trained["prior"]), str(tmp_path / "out"), "--dtype", "fp8"])
    assert not (tmp_path / "out").exists()


def test_a_clip_checkpoint_exports_to_a_clip_folder_with_the_same_hash(tmp_path, capsys):
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR
    from unclip.models.clip import build_clip, clip_metadata
    from unclip.models.clip_embedder import FrozenCLIP

    torch.manual_seed(0)
    model_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "clip" / "tiny.yaml"))
    model, oc_cfg = build_clip(model_cfg)
    ckpt = tmp_path / "clip.ckpt"  # a clip-stage checkpoint as CLIPModule writes it (network under "model.")
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "unclip": {"stage": "clip", **clip_metadata(model, model_cfg, oc_cfg)}}, ckpt)
    assert main([str(ckpt), str(tmp_path / "clip"), "--dtype", "bf16"]) == 1
    assert "exported in float32 only" in capsys.readouterr().err and not (tmp_path / "clip").exists()
    assert main([str(ckpt), str(tmp_path / "clip")]) == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "clip"
    assert FrozenCLIP.from_path(tmp_path / "clip").clip_hash == FrozenCLIP.from_path(ckpt).clip_hash
    assert main([str(tmp_path / "clip"), str(tmp_path / "again")]) == 1
    assert "is a folder: unclip-export takes a training checkpoint" in capsys.readouterr().err


def test_from_pretrained_imports_no_lightning(exported):
    code = ("import sys\nfrom unclip.pipeline import UnCLIPPipeline\n"
            f"pipe = UnCLIPPipeline.from_pretrained({str(exported)!r}, device='cpu')\n"
            "assert pipe('a red circle', seed=0, output_type='pt', prior={'steps': 4}).images.shape == (1, 3, 32, 32)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
