"""Two CPU processes (gloo) train every stage a few steps through the command line: DDP for clip, prior, decoder
and upsampler, FSDP for the prior. The checkpoints then load in one process: each stage's own loader, a
single-process run resuming a DDP checkpoint, and a sharded FSDP checkpoint consolidated into one file. FSDP and
DDP train the same prior from the same seed and data, so their weights (EMA included) must agree.

All five runs start at once (their waits for gloo and process start-up overlap); about a minute on 2 cores.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.scaleout.helpers import finish, start, train_cmd
from unclip.checkpoints import read_checkpoint
from unclip.training.sharded import consolidate_checkpoint, is_sharded_checkpoint, save_consolidated

STAGES = ("clip", "prior", "decoder", "upsampler")
RANKS, PER_RANK = 2, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_clip_export) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("distributed")
    chain = {"prior": [f"clip_ckpt={tiny_clip_export}"], "decoder": [f"clip_ckpt={tiny_clip_export}"]}
    jobs = {stage: ("ddp_cpu", stage) for stage in STAGES} | {"prior_fsdp": ("fsdp_cpu", "prior")}
    procs = {}
    for name, (trainer, stage) in jobs.items():
        cmd = train_cmd(stage, root / name, f"trainer={trainer}", *chain.get(stage, []))
        procs[name] = (start(cmd, root / "cwd" / name, root / f"{name}.log"), root / f"{name}.log")
    out = {}
    for name, (proc, log) in procs.items():
        code, tail = finish(proc, log, timeout=480)
        out[name] = {"code": code, "log": tail, "run_dir": root / name}
    return out


def _ok(run: dict) -> dict:
    assert run["code"] == 0, run["log"]
    metrics = json.loads((run["run_dir"] / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    return metrics


@pytest.mark.parametrize("stage", STAGES)
def test_two_process_ddp_trains_and_validates_every_stage(runs, stage):
    metrics = _ok(runs[stage])
    assert metrics["val/num_samples"] == RANKS * PER_RANK, "both ranks' validation batches are counted once"
    assert (runs[stage]["run_dir"] / "checkpoints" / "last.ckpt").is_file()
    assert not (runs[stage]["run_dir"] / "checkpoints" / "last.ckpt").is_dir()


def test_ddp_checkpoints_load_in_one_process_with_each_stages_loader(runs):
    from unclip.decoder_sampling import load_decoder, load_upsampler
    from unclip.models.clip import load_clip
    from unclip.models.prior_sampling import load_prior

    for stage in STAGES:
        _ok(runs[stage])
    ckpt = {s: runs[s]["run_dir"] / "checkpoints" / "last.ckpt" for s in STAGES}
    clip_meta = load_clip(runs["clip"]["run_dir"] / "clip_export")[2]
    assert clip_meta["clip_hash"] == read_checkpoint(ckpt["clip"])["unclip"]["clip_hash"]
    prior, _ = load_prior(ckpt["prior"])
    state = read_checkpoint(ckpt["prior"])["state_dict"]
    torch.testing.assert_close(prior.query, state["ema.module.query"])  # the EMA weights, not the training ones
    decoder, meta = load_decoder(ckpt["decoder"])
    assert meta.stage == "decoder" and not decoder.training
    upsampler, meta = load_upsampler(ckpt["upsampler"])
    assert meta.stage == "upsampler" and not upsampler.training


def test_a_ddp_checkpoint_resumes_in_a_single_process(runs, tmp_path):
    _ok(runs["upsampler"])
    source = runs["upsampler"]["run_dir"] / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "single"
    proc = start(train_cmd("upsampler", run_dir, "trainer=cpu", f"resume={source}", "resume_allow_data_change=true",
                           "trainer.max_steps=3",
                           "trainer.val_check_interval=3", "callbacks.checkpoint.every_n_train_steps=3"),
                 tmp_path, tmp_path / "single.log")
    code, tail = finish(proc, tmp_path / "single.log", timeout=300)
    assert code == 0, tail
    assert "resuming from" in tail and "world_size: 2 -> 1" in tail  # allowed, with the change named
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 3  # 2 from DDP + 1 here
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_fsdp_writes_sharded_checkpoints_equal_to_ddp_and_consolidates_them_for_one_process(runs, tmp_path):
    from unclip.models.prior_sampling import load_prior

    fsdp_metrics, ddp_metrics = _ok(runs["prior_fsdp"]), _ok(runs["prior"])
    sharded = runs["prior_fsdp"]["run_dir"] / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(sharded), "FSDP's last.ckpt is a folder of per-rank shards"
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    full = consolidate_checkpoint(sharded)
    ddp = read_checkpoint(runs["prior"]["run_dir"] / "checkpoints" / "last.ckpt")
    assert full["unclip"]["stage"] == "prior" and full["global_step"] == ddp["global_step"] == 2
    assert set(full["state_dict"]) == set(ddp["state_dict"]), "no FSDP or checkpoint-wrapper prefixes left"
    for key, value in ddp["state_dict"].items():  # same seed, data and averaged gradients: same weights
        torch.testing.assert_close(full["state_dict"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    for key in ("val/cos_pred", "val/mse_ema", "val/num_samples"):
        assert fsdp_metrics[key] == pytest.approx(ddp_metrics[key], rel=1e-4, abs=1e-5)
    path = save_consolidated(sharded, tmp_path / "prior.ckpt", weights_only=True)
    prior, meta = load_prior(path)  # the sampling loaders read it like any single-file checkpoint
    assert meta.stage == "prior" and "optimizer_states" not in read_checkpoint(path)
    torch.testing.assert_close(prior.query, ddp["state_dict"]["ema.module.query"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_fsdp_resumes_from_its_sharded_checkpoint(runs, tmp_path, tiny_clip_export):
    import shutil

    _ok(runs["prior_fsdp"])
    run_dir = tmp_path / "fsdp"
    shutil.copytree(runs["prior_fsdp"]["run_dir"] / "checkpoints", run_dir / "checkpoints")
    proc = start(train_cmd("prior", run_dir, "trainer=fsdp_cpu", "resume=true", f"clip_ckpt={tiny_clip_export}",
                           "trainer.max_steps=3", "trainer.val_check_interval=3",
                           "callbacks.checkpoint.every_n_train_steps=3"), tmp_path, tmp_path / "resume.log")
    code, tail = finish(proc, tmp_path / "resume.log", timeout=400)
    assert code == 0, tail
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 3
    assert consolidate_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3
