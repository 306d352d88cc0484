"""Every config group composes and instantiates; bad configs fail before compute, naming the key."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from tests.conftest import CONF_DIR, compose_train
from unclip.config import ConfigError, register_resolvers
from unclip.training.runner import train

STAGES = sorted(p.stem for p in (CONF_DIR / "stage").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def stage_of(experiment: str) -> str:
    return next(s for s in STAGES if f"_{s}_" in f"_{experiment}_")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes_and_builds_its_datamodule(stage, emoji_root, tmp_path):
    cfg = compose_train([f"stage={stage}", "data=emoji", f"run_dir={tmp_path}", "logger=csv"])
    assert cfg.stage == stage
    dm = instantiate(cfg.data)
    assert dm.image_size == cfg.data.image_size and len(dm.train_urls) == 4


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_dry_runs_on_the_meta_device(experiment, tmp_path, capsys):
    cfg = compose_train([f"stage={stage_of(experiment)}", f"experiment={experiment}", f"run_dir={tmp_path}",
                         "dry_run=true", "data=emoji"])
    report = train(cfg)
    assert report["stage"] == stage_of(experiment) and report["params"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"] == report["params"]
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


@pytest.mark.parametrize("group", ["trainer=cpu", "trainer=ddp_cpu", "logger=csv", "logger=wandb", "logger=none"])
def test_cpu_trainer_logger_and_callback_groups_instantiate(group, tmp_path):
    import pytorch_lightning as pl

    cfg = compose_train([group, f"run_dir={tmp_path}", "data=emoji"])
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = pl.Trainer(**instantiate(cfg.trainer, _convert_="partial"), callbacks=callbacks,
                         logger=loggers or False)
    assert trainer.max_steps == cfg.trainer.max_steps
    if group == "trainer=ddp_cpu":
        assert trainer.strategy._ddp_kwargs["broadcast_buffers"] is False


@pytest.mark.parametrize("group", ["trainer=gpu", "trainer=ddp"])
def test_gpu_trainer_groups_compose(group, tmp_path):
    cfg = compose_train([group, f"run_dir={tmp_path}"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


def test_unknown_top_level_key_is_an_error():
    with pytest.raises(ConfigCompositionException, match="bacth_size"):
        compose_train(["data.bacth_size=4"])


def test_misspelt_key_added_to_a_group_fails_before_compute_naming_the_group(tmp_path, emoji_root):
    cfg = compose_train(["data=emoji", "+data.bacth_size=4", f"run_dir={tmp_path}", "logger=csv"])
    with pytest.raises(ConfigError,
                       match=r"unknown key 'data.bacth_size' for .*ShardDataModule; valid keys: .*batch_size"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_misspelt_nested_and_trainer_keys_are_named(tmp_path, emoji_root):
    cfg = compose_train(["data=emoji", "+module.optimizer.learning_rate=1", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"unknown key 'module.optimizer.learning_rate' for torch.optim.AdamW"):
        train(cfg)
    cfg = compose_train(["data=emoji", "+trainer.max_stpes=3", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.max_stpes'"):
        train(cfg)


def test_missing_mandatory_key_is_named(tmp_path):
    cfg = compose_train(["data=webdataset", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="data.train_shards"):
        train(cfg)


def test_shards_that_match_no_files_fail_before_compute(tmp_path):
    cfg = compose_train(["data=webdataset", f"data.train_shards='{tmp_path}/x/{{00000..00003}}.tar'",
                         f"run_dir={tmp_path}", "logger=csv"])
    with pytest.raises(ValueError, match=r"data.train_shards: 4 shard\(s\) not found"):
        train(cfg)


def test_resume_without_a_checkpoint_is_refused(tmp_path, emoji_root):
    cfg = compose_train(["data=emoji", "resume=true", f"run_dir={tmp_path}", "logger=csv"])
    with pytest.raises(ConfigError, match="resume=True: no checkpoint"):
        train(cfg)


def test_demo_data_resolver_builds_the_builtin_set():
    cfg = compose_train(["data=demo"])
    assert cfg.data.train_shards.endswith(".tar") and "demo_shapes" in cfg.data.train_shards
    assert torch.get_num_threads() >= 1


def test_console_script_finds_the_configs_from_any_directory(tmp_path):
    import shutil
    import subprocess

    exe = shutil.which("unclip-train")
    if exe is None:
        pytest.skip("unclip-train is not installed as a console script")
    proc = subprocess.run([exe, "experiment=paper_clip", "dry_run=true", "data=emoji"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["stage"] == "clip"


# The sampling knobs of the chain commands as they composed before conf/sampling/ held them (guarded values).
SAMPLING = {
    "prior": {"sampler": "ddim", "steps": 64, "candidates": 2, "guidance_scale": 1.0},
    "decoder": {"sampler": None, "steps": None, "spacing": None, "guidance_scale": None, "eta": None},
    "upsamplers": {"sampler": None, "steps": None, "spacing": None, "eta": None, "noise_aug_level": None},
}
CHAIN_CONFIGS = ["sample", "evaluate", "evaluate_edit"]


def compose_config(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name=name, overrides=overrides))


@pytest.mark.parametrize("name", CHAIN_CONFIGS)
def test_chain_commands_compose_the_same_sampling_knobs(name):
    cfg = compose_config(name, [])
    assert {key: cfg[key] for key in SAMPLING} == SAMPLING
    cfg = compose_config(name, ["decoder.guidance_scale=2", "prior.steps=8", "upsamplers.steps=3"])
    assert (cfg["decoder"]["guidance_scale"], cfg["prior"]["steps"], cfg["upsamplers"]["steps"]) == (2, 8, 3)


def test_sampling_block_is_written_once():
    holders = [p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml")
               if "noise_aug_level: null" in p.read_text()]
    assert holders == ["sampling/default.yaml"]
    for name in CHAIN_CONFIGS:
        assert "sampling: default" in (CONF_DIR / f"{name}.yaml").read_text()
