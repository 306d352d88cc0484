"""Resume: a run SIGKILLed mid-epoch, then crashed at an epoch boundary and inside the epoch after it, resumed each
time, ends with the weights, EMA, optimiser and scheduler state of the run that was never interrupted; the data
loader's resume state replays epoch-mode streams exactly and draws fresh, seed-determined ones in resampled mode."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_train
from tests.reliability.helpers import MICRO_PRIOR, QUICK, run_until_marker, tensors_equal
from unclip.checkpoints import read_checkpoint
from unclip.training.runner import train

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*LeafSpec")
# 3 batches an epoch, a checkpoint every 2 steps: step 4 is one batch into epoch 1, step 6 ends epoch 1.
SCHEDULE = ["data.batch_size=8", "data.batches_per_epoch=3", "trainer.max_steps=10",
            "callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=3", "trainer.limit_val_batches=1"]


def prior_overrides(clip, run_dir, *extra: str) -> list[str]:
    return [*MICRO_PRIOR, *QUICK, *SCHEDULE, f"clip_ckpt={clip}", f"run_dir={run_dir}", *extra]


def final_state(run_dir) -> dict:
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return {"global_step": ckpt["global_step"], "state_dict": ckpt["state_dict"],
            "data": ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"],
            "optimizer": ckpt["optimizer_states"][0]["state"], "lr": ckpt["lr_schedulers"][0]["_last_lr"],
            "scheduler_step": ckpt["lr_schedulers"][0]["last_epoch"]}


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tiny_clip_export, emoji_root, tmp_path):
    killed = tmp_path / "killed"
    marker = tmp_path / "at_step_4"
    # SIGKILL before step 5: last.ckpt is step 4, one batch into epoch 1.
    run_until_marker(["-m", "unclip.train", *prior_overrides(tiny_clip_export, killed),
                      "+callbacks.hang._target_=tests.reliability.helpers.HangAt", "+callbacks.hang.step=4",
                      f"+callbacks.hang.marker={marker}"], marker, tmp_path / "killed.log")
    at_kill = read_checkpoint(killed / "checkpoints" / "last.ckpt")
    assert at_kill["global_step"] == 4 and at_kill["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 1, "step": 4, "seed": 0}]

    # Resumed in-process and crashed twice: at the end of epoch 1 (step 6, which Lightning resumes as the start of
    # epoch 2) and one batch later inside that resumed epoch (step 8).
    for crash in (6, 8):
        with pytest.raises(RuntimeError, match=f"injected crash at step {crash}"):
            train(compose_train(prior_overrides(tiny_clip_export, killed, "resume=true",
                                                "+callbacks.crash._target_=tests.reliability.helpers.CrashAt",
                                                f"+callbacks.crash.step={crash}")))
        assert read_checkpoint(killed / "checkpoints" / "last.ckpt")["global_step"] == crash
    out = train(compose_train(prior_overrides(tiny_clip_export, killed, "resume=true")))
    assert out["last_checkpoint"] is not None

    reference = tmp_path / "reference"
    train(compose_train(prior_overrides(tiny_clip_export, reference)))
    resumed, uninterrupted = final_state(killed), final_state(reference)
    assert resumed["global_step"] == uninterrupted["global_step"] == 10
    assert any(k.startswith("ema.") for k in resumed["state_dict"])  # the EMA is part of what is compared
    tensors_equal(resumed, uninterrupted)
    # Not vacuous: training went on after the step-4 checkpoint.
    assert any(not torch.equal(v, resumed["state_dict"][k]) for k, v in at_kill["state_dict"].items())


# ---- the data loader's resume state (no training) ------------------------------------------------------------

def loader(mode: str, emoji_root, state: dict | None = None):
    cfg = compose_train(["data=emoji", f"data.mode={mode}", "data.batch_size=4", "data.batches_per_epoch=5",
                         "data.num_workers=0", "data.shuffle_buffer=16", "data.image_size=16", "data.tokenizer=null",
                         f"data.train_shards='{emoji_root}/train/{{00000..00003}}.tar'"])
    dl = instantiate(cfg.data).train_dataloader()
    if state is not None:
        dl.load_state_dict(state)
    return dl


def keys(dl) -> list[tuple[str, ...]]:
    return [tuple(batch["key"]) for batch in dl]


def test_epoch_mode_resume_replays_the_rest_of_the_epoch(emoji_root):
    full = keys(loader("epoch", emoji_root))
    assert len(full) == 5
    dl = loader("epoch", emoji_root, {"epoch": 0, "batches": 2, "step": 2, "seed": 0})
    assert keys(dl) == full[2:]
    assert keys(dl) == full, "only the first pass after a restore skips"
    later = loader("epoch", emoji_root)
    later.epoch_fn = lambda: 3
    epoch3 = keys(later)
    assert epoch3 != full, "each epoch is shuffled afresh"
    assert keys(loader("epoch", emoji_root, {"epoch": 3, "batches": 4, "step": 19, "seed": 0})) == epoch3[4:]


def test_resampled_mode_resume_draws_a_fresh_seed_determined_stream(emoji_root):
    full = keys(loader("resampled", emoji_root))
    state = {"epoch": 0, "batches": 2, "step": 2, "seed": 0}
    first, again = keys(loader("resampled", emoji_root, state)), keys(loader("resampled", emoji_root, state))
    assert len(first) == 3, "the epoch keeps its length: the remaining 5 - 2 batches"
    assert first == again, "the stream after a resume is a function of (seed, step)"
    seen = {k for batch in full for k in batch}
    assert first != full[2:] and len({k for batch in first for k in batch} - seen) > 0
    assert keys(loader("resampled", emoji_root, {**state, "step": 4})) != first


def test_rng_states_round_trip_through_a_weights_only_checkpoint_and_validation_leaves_them(tmp_path):
    import random

    import numpy as np

    from unclip.checkpoints import atomic_save
    from unclip.training.callbacks import ResumeState, set_rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    callback = ResumeState()
    atomic_save({"callbacks": {"ResumeState": callback.state_dict()}}, tmp_path / "rng.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()  # move every stream on
    set_rng_state(read_checkpoint(tmp_path / "rng.ckpt")["callbacks"]["ResumeState"]["ranks"][0])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]

    before = torch.get_rng_state()
    callback.on_validation_start(None, None)
    torch.rand(7), np.random.rand(7), random.random()  # what a validation might draw
    callback.on_validation_end(None, None)
    assert torch.equal(torch.get_rng_state(), before)
