"""Pretrained open_clip CLIPs as the frozen CLIP: open_clip hub-layout folders, ARCH:weights, ARCH:random, our
exports, all through ``load_clip``; sizes, mean/std and tokenizer from the model's own config; hashes; errors."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import CONF_DIR, make_tiny_clip_export
from tests.models.open_clip_folders import TINY_CFG, register_arch, shrunk_vit_l14_cfg, write_open_clip_folder
from unclip.models import clip as clip_mod
from unclip.models.clip import create_clip, describe_clip, load_clip
from unclip.models.clip_embedder import FrozenCLIP, tokenizer_for
from unclip.models.clip_source import SourceKind, parse_clip_source

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
WIDER = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "width": 48}}  # weights that do not fit TINY_CFG


@pytest.fixture(autouse=True)
def fresh_hash_cache(tmp_path, monkeypatch):
    """Each test starts without remembered hashes (in-process and on disk)."""
    monkeypatch.setenv("UNCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(clip_mod, "_HASHES", {})


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    return register_arch(tmp_path_factory.mktemp("arch"), "unclip-test-tiny-ViT", TINY_CFG)


def open_clip_embeddings(folder: Path, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What plain open_clip computes for a folder: its own model, tokenizer and normalisation."""
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(captions)
    with torch.no_grad():
        image = model.encode_image(((images + 1) / 2 - mean) / std)
        text = model.encode_text(tokens)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def test_open_clip_folder_embeds_with_its_own_size_statistics_and_tokenizer(tmp_path):
    folder = write_open_clip_folder(tmp_path / "hub", mean=MEAN, std=STD)
    clip = FrozenCLIP.from_path(folder)
    assert clip.meta["image_size"] == 32 and clip.context_length == 16 and clip.embed_dim == 32
    assert clip.mean.flatten().tolist() == pytest.approx(MEAN) and clip.std.flatten().tolist() == pytest.approx(STD)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    captions = ["a red square", "two blue circles", "x"]
    want_image, want_text = open_clip_embeddings(folder, images, captions)
    assert torch.allclose(clip.embed_images(images), want_image, atol=1e-5)
    text = clip.embed_text(clip.tokenize(captions))
    assert torch.allclose(text["text_embed"], want_text, atol=1e-5)
    assert text["text_tokens"].shape == (3, 16, 32) and text["text_mask"].sum(1).tolist() == [5, 5, 3]
    # the same CLIP through local-dir:, and the data pipeline's tokenizer pads to the folder's context
    assert load_clip(f"local-dir:{folder}")[2]["clip_hash"] == clip.clip_hash
    assert tokenizer_for(str(folder))(captions).shape == (3, 16)


def test_folder_bin_and_arch_weights_and_dict_spellings_load_the_same_clip(tmp_path, tiny_arch):
    both = write_open_clip_folder(tmp_path / "both", safe_serialization="both")
    binary = write_open_clip_folder(tmp_path / "bin", safe_serialization=False)
    assert not (binary / "open_clip_model.safetensors").exists()
    weights = binary / "open_clip_pytorch_model.bin"
    specs = [str(both), str(binary), f"{tiny_arch}:{weights}", {"arch": tiny_arch, "pretrained": str(weights)}]
    metas = [load_clip(spec)[2] for spec in specs]
    assert len({m["clip_hash"] for m in metas}) == 1
    # ARCH:file is what open_clip.create_model(arch, pretrained=file) builds
    reference = open_clip.create_model(tiny_arch, pretrained=str(weights)).eval()
    model = load_clip(f"{tiny_arch}:{weights}")[0]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), reference.encode_image(pixels))
    arch_meta = metas[2]
    assert arch_meta["arch"] == tiny_arch and arch_meta["image_mean"] == list(open_clip.OPENAI_DATASET_MEAN)


def test_our_export_reads_through_the_same_path_with_its_recorded_metadata(tmp_path):
    export = make_tiny_clip_export(tmp_path / "export")
    meta = load_clip(export)[2]
    recorded = json.loads((export / "open_clip_config.json").read_text())["unclip"]
    for key in ("clip_hash", "image_size", "image_mean", "image_std", "embed_dim", "context_length", "arch"):
        assert meta[key] == recorded[key], key
    assert meta["model_config"] == recorded["model_config"]
    assert describe_clip(export)["clip_hash"] == recorded["clip_hash"]  # recorded: known without loading


def test_hash_of_a_pretrained_clip_is_cached_per_weights_file(tmp_path, monkeypatch):
    folder = write_open_clip_folder(tmp_path / "hub")
    assert describe_clip(folder)["clip_hash"] is None  # never loaded: unknown without reading the weights
    first = load_clip(folder)[2]["clip_hash"]
    assert describe_clip(folder)["clip_hash"] == first
    monkeypatch.setattr(clip_mod, "_HASHES", {})  # a new process: the disk cache answers
    assert describe_clip(folder)["clip_hash"] == first
    monkeypatch.setattr(clip_mod, "clip_hash", lambda state: pytest.fail("hash recomputed despite the cache"))
    assert load_clip(folder)[2]["clip_hash"] == first
    monkeypatch.undo()
    monkeypatch.setenv("UNCLIP_CACHE", str(tmp_path / "cache"))
    write_open_clip_folder(tmp_path / "hub", seed=1)  # new weights in the same file: a new hash
    assert load_clip(folder)[2]["clip_hash"] != first


def test_arch_random_is_seeded_so_chains_still_check(tiny_arch):
    first, second = load_clip(f"{tiny_arch}:random")[2], load_clip(f"{tiny_arch}:random")[2]
    assert first["clip_hash"] == second["clip_hash"]
    assert torch.equal(load_clip(f"{tiny_arch}:random")[0].text_projection,
                       load_clip(f"{tiny_arch}:random")[0].text_projection)


def test_download_spellings_parse_without_touching_the_network():
    hub = parse_clip_source("hf-hub:timm/vit_large_patch14_clip_224.openai")
    assert (hub.kind, hub.location, hub.arch) == (SourceKind.DOWNLOAD, "timm/vit_large_patch14_clip_224.openai", None)
    tag = parse_clip_source("ViT-L-14-quickgelu:openai")
    assert (tag.kind, tag.arch, tag.tag) == (SourceKind.DOWNLOAD, "ViT-L-14-quickgelu", "openai")
    meta = describe_clip("ViT-L-14-quickgelu:openai")  # registry + pretrained-tag config: both local
    assert (meta["embed_dim"], meta["text_width"], meta["context_length"], meta["image_size"]) == (768, 768, 77, 224)


def test_openai_vit_l14_architecture_preset_builds_at_full_size_on_the_meta_device():
    from omegaconf import OmegaConf

    from unclip.models.clip import open_clip_config

    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "clip" / "openai_vit_l14.yaml"))
    oc_cfg = open_clip_config(cfg)
    with torch.device("meta"):
        model = create_clip(oc_cfg)
    assert 427e6 < sum(p.numel() for p in model.parameters()) < 429e6  # OpenAI's ViT-L/14: 427.6M
    assert (model.visual.image_size, model.context_length, model.transformer.width) == ((224, 224), 77, 768)
    assert oc_cfg["quick_gelu"] is True and cfg["image_mean"] == list(open_clip.OPENAI_DATASET_MEAN)


def test_shrunk_vit_l14_keeps_the_clip_facing_sizes(tmp_path):
    meta = load_clip(write_open_clip_folder(tmp_path / "l14", shrunk_vit_l14_cfg()))[2]
    assert (meta["embed_dim"], meta["text_width"], meta["context_length"], meta["image_size"]) == (768, 768, 77, 224)


def _edit_config(folder: Path, edit) -> Path:
    path = folder / "open_clip_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda d, _: (write_open_clip_folder(d), (d / "open_clip_model.safetensors").unlink())[0],
     r"hub: open_clip_config.json but no weights \(open_clip_model.safetensors or open_clip_pytorch_model.bin\)"),
    (lambda d, _: (write_open_clip_folder(d), (d / "open_clip_config.json").unlink())[0],
     r"hub: no open_clip_config.json"),
    (lambda d, _: _edit_config(write_open_clip_folder(d), lambda c: c["model_cfg"]["vision_cfg"].pop("image_size")),
     r"hub/open_clip_config.json: model_cfg.vision_cfg.image_size must be one int"),
    (lambda d, _: _edit_config(write_open_clip_folder(d), lambda c: c.pop("model_cfg")),
     r"hub/open_clip_config.json: no 'model_cfg'"),
    (lambda d, _: _edit_config(write_open_clip_folder(d), lambda c: c["preprocess_cfg"].update(mean=[0.5, 0.5])),
     r"hub/open_clip_config.json: preprocess_cfg.mean must be 3 numbers"),
    (lambda d, _: _edit_config(write_open_clip_folder(d), lambda c: c["model_cfg"]["text_cfg"].update(
        hf_model_name="bert-base-uncased")), r"hub/open_clip_config.json: model_cfg.text_cfg.hf_model_name is set"),
    (lambda d, _: (write_open_clip_folder(d), (d / "open_clip_config.json").write_text("{oops"))[0],
     r"hub/open_clip_config.json is not valid JSON"),
    (lambda d, _: f"ViT-Nope-99:{write_open_clip_folder(d) / 'open_clip_model.safetensors'}",
     r"'ViT-Nope-99' is not an open_clip architecture"),
    (lambda d, _: "ViT-B-32", r"ViT-B-32 is an open_clip architecture without weights: write ViT-B-32:path/to/weights"),
    (lambda d, _: f"ViT-B-32:{d / 'missing.bin'}",
     r"no weights file .*missing.bin, and .* is not a pretrained tag of ViT-B-32"),
    (lambda d, _: str(write_open_clip_folder(d) / "open_clip_model.safetensors"),
     r"is a bare weights file: name its arch"),
    (lambda d, _: str(d / "nothing_here"), r"no CLIP at .*nothing_here: expected a clip-stage .ckpt"),
    (lambda d, _: f"local-dir:{d / 'nothing_here'}", r"local-dir:.*nothing_here is not a folder"),
    (lambda d, arch: f"{arch}:{write_open_clip_folder(d, WIDER) / 'open_clip_model.safetensors'}",
     r"open_clip_model.safetensors: cannot load it into the CLIP of unclip-test-tiny-ViT:"),
])
def test_bad_sources_name_the_file_and_the_field(tmp_path, tiny_arch, make, message):
    spec = make(tmp_path / "hub", tiny_arch)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_clip(spec)


@pytest.mark.slow  # ~50 s on 2 cores; the folder's embeddings are checked fast above
@pytest.mark.filterwarnings("ignore:You are trying to", "ignore:.*LeafSpec")
def test_unclip_eval_scores_with_an_open_clip_folder(tiny_chain, tmp_path):
    from tests.evaluation.conftest import chain_eval_config
    from unclip.evaluation.run import evaluate

    scorer = write_open_clip_folder(tmp_path / "scorer", mean=MEAN, std=STD)  # 32px: not the chain CLIP's size
    cfg = chain_eval_config("evaluate", tiny_chain, tmp_path / "eval", f"cache_dir={tmp_path / 'cache'}",
                            f"clip_scorer={scorer}", "feature_extractor=clip", "num_samples=4", "batch_size=4",
                            "prior.steps=2", "decoder.steps=2", "upsamplers.steps=2", "kid.subsets=2", "grid_size=4")
    report = evaluate(cfg)
    assert report["clip_scorer"] == f"{scorer} (hash {load_clip(scorer)[2]['clip_hash'][:12]})"
    assert "clip_scorer_warning" not in report and -1.0 <= report["clip_score"] / 100 <= 1.0
