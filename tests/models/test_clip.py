"""open_clip factory, tokenizer, weight hash, export to plain open_clip and safe loading."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from unclip.models.clip import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    build_clip,
    clip_hash,
    clip_metadata,
    create_clip,
    export_open_clip,
    load_clip,
    make_tokenizer,
    open_clip_config,
    retrieval_recall,
    to_clip_pixels,
)

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "clip"


def micro_config(**changes) -> dict:
    """The tiny preset shrunk further, so a test builds it in milliseconds."""
    cfg = yaml.safe_load((CONF / "tiny.yaml").read_text())
    cfg["vision"].update(image_size=16, patch_size=8, width=32, layers=1, head_width=16)
    cfg["text"].update(context_length=8, width=32, heads=2, layers=1)
    cfg["embed_dim"] = 16
    cfg.update(changes)
    return cfg


def inputs(cfg: dict, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = cfg["vision"]["image_size"]
    images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    tokens = make_tokenizer(None, cfg["text"]["context_length"])([f"a photo of thing {i}" for i in range(batch)])
    return images, tokens


def embeddings(model, cfg: dict, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = to_clip_pixels(images, torch.tensor(cfg["image_mean"]), torch.tensor(cfg["image_std"]))
    with torch.no_grad():
        return model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True)


def exported(tmp_path: Path, cfg: dict) -> tuple[torch.nn.Module, dict, Path]:
    torch.manual_seed(0)
    model, oc_cfg = build_clip(cfg)
    meta = clip_metadata(model, cfg, oc_cfg)
    return model, meta, export_open_clip(model, meta, tmp_path / "export")


def test_config_translates_fields_and_arch_overrides():
    oc = open_clip_config(micro_config())
    assert oc["embed_dim"] == 16 and oc["vision_cfg"]["width"] == 32 and oc["text_cfg"]["context_length"] == 8
    b32 = open_clip_config({"arch": "ViT-B-32", "embed_dim": None, "vision": {"image_size": 64, "layers": None},
                            "text": {"context_length": 20}, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]})
    assert b32["vision_cfg"] == {"image_size": 64, "layers": 12, "width": 768, "patch_size": 32}
    assert b32["embed_dim"] == 512 and b32["text_cfg"]["context_length"] == 20


@pytest.mark.parametrize("bad, message", [({"arch": "ViT-Nope"}, "not an open_clip architecture"),
                                          ({"vison": {}}, "unknown model config keys"),
                                          ({"arch": "coca_ViT-B-32"}, "CoCa")])
def test_config_errors_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        open_clip_config(micro_config(**bad))


def test_unknown_tower_field_is_refused():
    cfg = micro_config()
    cfg["vision"]["widht"] = 64
    with pytest.raises(ValueError, match="widht"):
        create_clip(open_clip_config(cfg))


def test_paper_preset_is_vit_h16_at_256px_with_24x1024_text():
    cfg = yaml.safe_load((CONF / "paper.yaml").read_text())
    with torch.device("meta"):
        model, oc = build_clip(cfg)
    assert oc["vision_cfg"]["image_size"] == 256 and model.visual.patch_size == (16, 16)
    assert len(model.visual.transformer.resblocks) == 32 and model.visual.transformer.width == 1280
    assert len(model.transformer.resblocks) == 24 and model.transformer.width == 1024
    assert model.attn_mask is not None, "text transformer must be causal"
    params = sum(p.numel() for p in model.parameters())
    assert 0.9e9 < params < 1.1e9, params  # ViT-H/16 CLIP is ~1B parameters


def test_tokenizer_pickles_and_pads_to_context_length():
    tok = pickle.loads(pickle.dumps(make_tokenizer(None, 12)))
    tokens = tok(["a red circle", "a " * 40])
    assert tokens.shape == (2, 12) and tokens.dtype == torch.long
    assert tokens[0, 0] == 49406 and tokens[1, -1] == 49407  # start token; truncated caption still ends in eot


def test_to_clip_pixels_maps_unit_range_to_clip_normalisation():
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.5])
    images = torch.stack([torch.full((3, 2, 2), -1.0), torch.full((3, 2, 2), 1.0)])
    out = to_clip_pixels(images, mean, std)
    assert torch.allclose(out[0, :, 0, 0], (0 - mean) / std) and torch.allclose(out[1, :, 0, 0], (1 - mean) / std)


def test_clip_hash_is_canonical_and_sensitive():
    state = {"b": torch.arange(4.0), "a": torch.ones(2, 2)}
    same = {"a": torch.ones(2, 2), "b": torch.arange(4.0)}
    assert clip_hash(state) == clip_hash(same)
    assert clip_hash(state) != clip_hash({**same, "b": torch.tensor([0.0, 1.0, 2.0, 3.5])})
    assert clip_hash(state) != clip_hash({**same, "a": torch.ones(2, 2, dtype=torch.float64)})
    assert clip_hash(state) != clip_hash({**same, "a": torch.ones(4)})  # same bytes, other shape


def test_export_loads_in_plain_open_clip_with_same_embeddings(tmp_path):
    cfg = micro_config()
    model, meta, directory = exported(tmp_path, cfg)
    assert {p.name for p in directory.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    plain = open_clip.create_model("local-dir:" + str(directory)).eval()
    images, tokens = inputs(cfg)
    ours = embeddings(model.eval(), cfg, images, tokens)
    theirs = embeddings(plain, cfg, images, tokens)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    assert plain.visual.preprocess_cfg["mean"] == cfg["image_mean"]
    assert plain.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-5)


def test_pretrained_weights_load_through_open_clips_loader(tmp_path):
    cfg = micro_config()
    model, meta, directory = exported(tmp_path, cfg)
    torch.manual_seed(1)  # a different random init, overwritten by the file
    again, _ = build_clip({**cfg, "pretrained": str(directory / WEIGHTS_FILE)})
    assert clip_hash(again.state_dict()) == meta["clip_hash"]
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_clip({**cfg, "pretrained": "laion2b_s34b_b79k"})


def test_load_clip_from_export_round_trips(tmp_path):
    cfg = micro_config()
    model, meta, directory = exported(tmp_path, cfg)
    loaded, tokenizer, loaded_meta = load_clip(directory)
    assert loaded_meta["clip_hash"] == meta["clip_hash"] == clip_hash(model.state_dict())
    assert (loaded_meta["embed_dim"], loaded_meta["context_length"], loaded_meta["image_size"]) == (16, 8, 16)
    assert loaded_meta["model_config"] == cfg and not loaded.training
    images, _ = inputs(cfg)
    tokens = tokenizer([f"a photo of thing {i}" for i in range(4)])
    ours, theirs = embeddings(model.eval(), cfg, images, tokens), embeddings(loaded, cfg, images, tokens)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_clip_refuses_weights_that_do_not_match_the_recorded_hash(tmp_path):
    _, _, directory = exported(tmp_path, micro_config())
    tensors = load_file(str(directory / WEIGHTS_FILE))
    tensors["logit_scale"] = tensors["logit_scale"] + 1
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="differs from the recorded"):
        load_clip(directory)


def lightning_like_checkpoint(stage: str, tmp_path: Path) -> Path:
    cfg = micro_config()
    model, oc_cfg = build_clip(cfg)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "unclip": {"stage": stage, **clip_metadata(model, cfg, oc_cfg)}}
    path = tmp_path / f"{stage}.ckpt"
    torch.save(ckpt, path)
    return path


def test_load_clip_reads_a_clip_stage_checkpoint(tmp_path):
    model, _, meta = load_clip(lightning_like_checkpoint("clip", tmp_path))
    assert meta["clip_hash"] == clip_hash(model.state_dict()) and meta["embed_dim"] == 16


def test_load_clip_refuses_another_stage(tmp_path):
    with pytest.raises(ValueError, match="'prior' stage checkpoint; a 'clip' checkpoint"):
        load_clip(lightning_like_checkpoint("prior", tmp_path))
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not an unclip checkpoint"):
        load_clip(tmp_path / "plain.ckpt")


class _Payload:
    """Unpickling this would create a file: proof that the loader ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_clip_refuses_pickled_objects_without_running_them(tmp_path):
    marker = tmp_path / "code_ran"
    path = lightning_like_checkpoint("clip", tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["callbacks"] = {"evil": _Payload(marker)}
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="pickled Python objects"):
        load_clip(path)
    assert not marker.exists()


def test_retrieval_recall_known_cases():
    eye = torch.eye(5)
    perfect = retrieval_recall(eye, eye, [1, 5])
    assert perfect == {"i2t_recall@1": 1.0, "t2i_recall@1": 1.0, "i2t_recall@5": 1.0, "t2i_recall@5": 1.0}
    collapsed = retrieval_recall(torch.ones(5, 2), torch.ones(5, 2), [1, 4, 5])
    assert collapsed["i2t_recall@1"] == 0.0 and collapsed["i2t_recall@4"] == 0.0 and collapsed["t2i_recall@5"] == 1.0
    # sim = images @ texts.T = [[0.6, 0.0], [0.8, 1.0]]: every image finds its text first, but image 1
    # scores text 0 higher (0.8) than image 0 does (0.6), so text 0 retrieves its image second.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    r = retrieval_recall(images, texts, [1, 2])
    assert r == {"i2t_recall@1": 1.0, "t2i_recall@1": 0.5, "i2t_recall@2": 1.0, "t2i_recall@2": 1.0}
