"""Scale-out presets and switches, in one process: the FSDP trainer preset's policies, the SLURM launcher's sbatch
script, resume=auto, one run_dir per Hydra job, and the prior's and CLIP's memory/speed switches."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_train
from unclip.config import ConfigError
from unclip.models.prior import Block, PriorTransformer
from unclip.training.attention import sdpa_backend
from unclip.training.fsdp import module_types
from unclip.training.runner import checkpoint_to_resume, latest_checkpoint, use_hydra_job_dir

# ---- trainer presets ---------------------------------------------------------------------------------------

def test_fsdp_preset_wraps_and_checkpoints_every_block_kind_and_saves_shards(tmp_path):
    from open_clip.transformer import ResidualAttentionBlock
    from pytorch_lightning.strategies import FSDPStrategy

    from unclip.models.unet_blocks import AttentionBlock, ResBlock, TextBlock
    from unclip.training.sharded import SafeFSDPStrategy

    cfg = compose_train(["trainer=fsdp", f"run_dir={tmp_path}"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed" and cfg.trainer.num_nodes == 1
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy) is SafeFSDPStrategy and isinstance(strategy, FSDPStrategy)
    assert strategy._state_dict_type == "sharded"
    blocks = {Block, ResBlock, AttentionBlock, TextBlock, ResidualAttentionBlock}
    assert blocks <= strategy.kwargs["auto_wrap_policy"]._module_classes
    assert set(strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes) == blocks
    assert strategy.kwargs["use_orig_params"], "parameter groups (no weight decay on gains) need the original params"


def test_module_types_names_a_bad_entry():
    with pytest.raises(ConfigError, match="cannot import 'unclip.models.prior.Blok'"):
        module_types(["unclip.models.prior.Blok"])
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        module_types(["unclip.training.fsdp.ForwardOnly"])


def test_slurm_launcher_preset_asks_for_nodes_gpus_and_lightnings_requeue_signal(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'unclip[slurm]'")
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=4", "hydra.launcher.partition=gpu",
                                 f"hydra.sweep.dir={tmp_path}"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["tasks_per_node"] == 8
    # The sbatch script submitit writes from these parameters (as the launcher passes them; srun faked).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm", slurm_max_num_timeout=0)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout", "name")})
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8", "--partition=gpu", "--time=4320",
                 "--signal=USR1@120", "--requeue\n"):
        assert line in script, line
    assert "USR2" not in script, "submitit's own signal is replaced by Lightning's"


# ---- resume=auto and run_dir per job -------------------------------------------------------------------------

def test_resume_auto_starts_fresh_then_takes_the_newest_checkpoint(tmp_path):
    cfg = OmegaConf.create({"resume": "auto", "run_dir": str(tmp_path)})
    assert checkpoint_to_resume(cfg) is None  # a job's first start
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert checkpoint_to_resume(cfg) == str(last)  # preempted (SIGTERM): only the periodic checkpoint
    requeue = tmp_path / "checkpoints" / "requeue.ckpt"
    requeue.write_bytes(b"x")
    for n in (2, 10):  # an older unclip's (Lightning's) requeue saves
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"x")
    newer = time.time() + 5
    os.utime(requeue, (newer, newer))
    assert latest_checkpoint(tmp_path) == requeue  # requeued on USR1: RequeueOnSignal's save
    os.utime(tmp_path / "hpc_ckpt_10.ckpt", (newer + 2, newer + 2))
    assert latest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_10.ckpt"
    os.utime(last, (newer + 5, newer + 5))
    assert latest_checkpoint(tmp_path) == last  # a periodic save after the last requeue is newer


def _hydra(mode: RunMode, output_dir: str, task=(), hydra_overrides=()):
    return SimpleNamespace(mode=mode, runtime=SimpleNamespace(output_dir=output_dir),
                           overrides=SimpleNamespace(task=list(task), hydra=list(hydra_overrides)))


def test_each_multirun_job_and_each_ddp_rank_writes_into_hydras_job_dir():
    cfg = OmegaConf.create({"run_dir": "runs/demo/prior", "module": {"run_dir": "${run_dir}"}})
    use_hydra_job_dir(cfg, _hydra(RunMode.RUN, "/abs/runs/demo/prior"))
    assert cfg.run_dir == "runs/demo/prior", "a plain run keeps its run_dir"
    use_hydra_job_dir(cfg, _hydra(RunMode.MULTIRUN, "/sweep/3", task=["model.depth=2"]))
    assert cfg.run_dir == "/sweep/3" and cfg.module.run_dir == "/sweep/3"
    cfg = OmegaConf.create({"run_dir": "a"})
    use_hydra_job_dir(cfg, _hydra(RunMode.MULTIRUN, "/sweep/0", task=["run_dir=a,b"]))
    assert cfg.run_dir == "a", "a sweep over run_dir itself keeps its values"
    cfg = OmegaConf.create({"run_dir": "runs/prior/12-00-07"})  # rank 1's own ${now:...}
    use_hydra_job_dir(cfg, _hydra(RunMode.RUN, "/abs/runs/prior/12-00-05", hydra_overrides=[
        'hydra.run.dir="/abs/runs/prior/12-00-05"', "hydra.job.name=train_ddp_process_1"]))
    assert cfg.run_dir == "/abs/runs/prior/12-00-05", "Lightning's rank 1 follows rank 0's dir"


# ---- switches --------------------------------------------------------------------------------------------------

def _prior() -> PriorTransformer:
    torch.manual_seed(0)
    net = PriorTransformer(embed_dim=16, text_width=8, context_length=6, width=32, depth=3, heads=2, mlp_ratio=2.0,
                           embed_scale=17.2).double()
    for p in net.parameters():  # no zero-initialised output: gradients reach every block
        torch.nn.init.normal_(p, std=0.1)
    return net


def _prior_inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = False
    return (torch.randn(4, 16, generator=g, dtype=torch.float64), torch.tensor([0, 10, 500, 999]),
            torch.randn(4, 16, generator=g, dtype=torch.float64),
            torch.randn(4, 6, 8, generator=g, dtype=torch.float64), mask, torch.tensor([False, True, False, False]))


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_prior_grad_checkpointing_and_sdpa_kernel_leave_outputs_and_gradients_unchanged(backend):
    results = []
    for checkpointing in (False, True):
        net = _prior()
        net.set_grad_checkpointing(checkpointing)
        with sdpa_backend(backend):  # backward too: checkpointed blocks recompute with the same kernel
            out = net(*_prior_inputs())
            out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)
    assert any(g.abs().sum() > 0 for n, g in results[0][1].items() if n.startswith("blocks.0."))


def test_prior_module_wires_its_switches_and_refuses_flash(tmp_path):
    cfg = compose_train(["experiment=emoji_prior_tiny", "run_dir=null", "model.embed_dim=16", "model.text_width=8",
                         "model.context_length=6", "module.grad_checkpointing=true", "module.compile=true",
                         "module.attention=math"])
    module = instantiate(cfg.module, _recursive_=False)
    assert module.net.grad_checkpointing and module.attention == "math"
    module.configure_model()
    assert type(module._train_net[0]).__name__ == "OptimizedModule" and module._train_net[0]._orig_mod is module.net
    assert not any(k.startswith("_train_net") for k in module.state_dict()), "checkpoint keys unchanged"
    cfg.module.attention = "flash"
    with pytest.raises(InstantiationException, match="flash attention takes no mask"):
        instantiate(cfg.module, _recursive_=False)


def test_clip_channels_last_gives_the_same_embeddings():
    outputs = []
    for channels_last in (False, True):
        cfg = compose_train(["stage=clip", "run_dir=null", "model/clip=tiny", f"module.channels_last={channels_last}",
                             "module.attention=math"])
        torch.manual_seed(0)
        module = instantiate(cfg.module, _recursive_=False).eval()
        conv = module.model.visual.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last or conv.shape[-1] == 1
        g = torch.Generator().manual_seed(0)
        images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
        tokens = torch.randint(1, 100, (2, cfg.model.text.context_length), generator=g)
        with torch.no_grad():
            outputs.append(module(images, tokens)[:2])
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("experiment", ["paper_prior", "paper_decoder"])
def test_dry_run_of_a_paper_preset_needs_no_data(experiment, capsys):
    """README's model-size command, as written: a dry run builds no data, so unset shard keys are no error."""
    from unclip.training.runner import train

    report = train(compose_train([f"experiment={experiment}", "dry_run=true"]))
    assert report["stage"] == experiment.split("_")[1] and report["params"] > 10**9


def test_training_still_names_the_missing_shards():
    from unclip.training.runner import train

    with pytest.raises(ConfigError, match="config key 'data.train_shards' must be set"):
        train(compose_train(["experiment=paper_prior"]))
