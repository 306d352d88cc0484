"""One process versus two CPU ranks (DDP, FSDP with conf/trainer/fsdp.yaml's wrapping) training the prior network on
the same global batches with the same per-sample noise, for tests/scaleout/test_gradient_scale.py.

Every input (embeddings, captions, timesteps, noise) is drawn for the whole global batch from a generator seeded by
the step, and a rank takes its rows: a sample gets the same noise in every layout, so the layouts must agree to
float precision. Plain SGD (no Adam normalisation, no clipping) makes the weights move in proportion to the
gradient: a gradient scaled by the world size moves them twice as far.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR

B, D, TEXT_WIDTH, CONTEXT, STEPS, LR = 8, 16, 16, 6, 3, 0.5


def build() -> tuple[torch.nn.Module, object]:
    from unclip.diffusion import create_diffusion
    from unclip.models.prior import PriorTransformer

    torch.manual_seed(0)
    net = PriorTransformer(embed_dim=D, text_width=TEXT_WIDTH, context_length=CONTEXT, width=32, depth=2, heads=2,
                           mlp_ratio=2.0, embed_scale=1.0)
    stage = OmegaConf.load(CONF_DIR / "stage" / "prior.yaml")
    diffusion = create_diffusion(**OmegaConf.to_container(stage.module.diffusion))
    return net, diffusion


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Step ``step``'s whole batch, noise and timesteps included (the same in every layout)."""
    g = torch.Generator().manual_seed(1000 + step)
    return {"x0": torch.randn(B, D, generator=g), "text_embed": torch.randn(B, D, generator=g),
            "text_tokens": torch.randn(B, CONTEXT, TEXT_WIDTH, generator=g),
            "text_mask": torch.ones(B, CONTEXT, dtype=torch.bool), "t": torch.randint(0, 1000, (B,), generator=g),
            "noise": torch.randn(B, D, generator=g), "cond_drop_mask": torch.zeros(B, dtype=torch.bool)}


def loss_of(model: torch.nn.Module, diffusion, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prior module's loss (unclip.training.prior_module): the per-example terms' mean over this rank's rows."""
    extra = {k: batch[k] for k in ("text_embed", "text_tokens", "text_mask", "cond_drop_mask")}
    return diffusion.training_losses(model, batch["x0"], batch["t"], extra, noise=batch["noise"])["loss"].mean()


def train(model: torch.nn.Module, diffusion, rows: slice, loss_scale: float = 1.0) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        batch = {k: v[rows] for k, v in global_batch(step).items()}
        optimizer.zero_grad()
        (loss_of(model, diffusion, batch) * loss_scale).backward()
        optimizer.step()


def single_process() -> dict[str, torch.Tensor]:
    net, diffusion = build()
    train(net, diffusion, slice(None))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


LAYOUTS = ("ddp", "fsdp", "fsdp_scale_error")  # the last: FSDP with the loss times the world size (an injected bug)


def rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Train each of :data:`LAYOUTS` on ``world`` ranks; rank 0 writes its full weights to ``out_dir/<layout>.pt``."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel

    from unclip.training.fsdp import module_types

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    per = B // world
    rows = slice(rank * per, (rank + 1) * per)
    wrap = OmegaConf.load(CONF_DIR / "trainer" / "fsdp.yaml").strategy.auto_wrap_policy.names
    for layout in LAYOUTS:
        net, diffusion = build()
        if layout == "ddp":
            model: torch.nn.Module = DistributedDataParallel(net)
        else:
            model = FullyShardedDataParallel(net, auto_wrap_policy=ModuleWrapPolicy(module_types(list(wrap))),
                                             device_id=torch.device("cpu"), use_orig_params=True)
        train(model, diffusion, rows, loss_scale=float(world) if layout.endswith("scale_error") else 1.0)
        if layout == "ddp":
            state = net.state_dict()
        else:
            config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
            with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
                state = model.state_dict()
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in state.items()}, Path(out_dir) / f"{layout}.pt")
        dist.barrier()
    dist.destroy_process_group()
