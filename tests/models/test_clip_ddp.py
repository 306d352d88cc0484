"""Two CPU processes (gloo, DistributedDataParallel) against one process on the concatenated batch.

With open_clip's ClipLoss and ``gather_with_grad``, rank r's loss is its rows' share of the full loss
(``local_loss``) or the full loss itself; ``torch.distributed.nn.all_gather`` sums the ranks' feature
gradients in backward and DDP averages parameter gradients, so in both cases:

    mean over ranks of the rank losses  == the single-process loss on the concatenated batch
    DDP's averaged parameter gradients  == the single-process gradients

SigLIP (neighbour exchange) obeys the same identities. Without ``gather_with_grad`` the local loss only
sees gradients through its own rows, and the test checks that this (wrong) setting does differ, so the
comparison is sharp enough to catch a broken gather. Everything runs in float64 to keep tolerances tight.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.models.test_clip import micro_config
from unclip.models.clip import build_clip, make_loss
from unclip.models.hard_negative_loss import HardNegativeClipLoss
from unclip.training.clip_module import gather_rows, set_ddp_buffer_sync

WORLD = 2
PER_RANK = 3
# name: (loss kind, local_loss, gather_with_grad, model has a logit bias)
CASES = {"local_gather_grad": ("clip", True, True, False),
         "global_gather_grad": ("clip", False, True, False),
         "local_no_grad_gather": ("clip", True, False, False),
         "siglip": ("siglip", False, False, True)}
# Hard-negative captions (NegCLIP): name -> (local_loss, gather_with_grad); K per sample, some slots empty.
NEGATIVE_CASES = {"negatives_local": (True, True), "negatives_global": (False, True),
                  "negatives_local_no_grad_gather": (True, False)}
K = 2


def _model(with_bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = build_clip(micro_config(init_logit_bias=-10.0 if with_bias else None,
                                       text={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2,
                                             "layers": 1}))
    return model.double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * PER_RANK, 3, 16, 16, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 100, (WORLD * PER_RANK, 8), generator=g)
    return images, tokens


def _negatives() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, 100, (WORLD * PER_RANK, K, 8), generator=g)
    mask = torch.rand(WORLD * PER_RANK, K, generator=g) > 0.3
    mask[0] = False  # a row without any negative
    return tokens, mask


def _negative_loss(model, loss_fn, images, tokens, negatives, mask) -> torch.Tensor:
    b = images.shape[0]
    image_f, text_f, scale = model(images, torch.cat([tokens, negatives.reshape(b * K, -1)]))[:3]
    return loss_fn(image_f, text_f[:b], scale, text_f[b:].view(b, K, -1), mask)


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(out, tensor)
    return torch.stack(out)


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))  # a mismatched collective fails instead of hanging
    torch.set_num_threads(1)
    images, tokens = _batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for name, (kind, local_loss, gather_with_grad, bias) in CASES.items():
        ddp = DistributedDataParallel(_model(bias))
        loss = make_loss(kind, local_loss, gather_with_grad, rank=rank, world_size=WORLD)(
            *ddp(images[rows], tokens[rows]))
        loss.backward()  # DDP all-reduces (averages) the parameter gradients here
        results[name] = {"losses": _all_gather(loss.detach().reshape(1)).flatten(),
                         "grads": {n: p.grad.clone() for n, p in ddp.module.named_parameters()}}
    negatives, mask = _negatives()
    for name, (local_loss, gather_with_grad) in NEGATIVE_CASES.items():
        ddp = DistributedDataParallel(_model(False))
        loss = _negative_loss(ddp, HardNegativeClipLoss(local_loss, gather_with_grad, rank=rank, world_size=WORLD),
                              images[rows], tokens[rows], negatives[rows], mask[rows])
        loss.backward()
        results[name] = {"losses": _all_gather(loss.detach().reshape(1)).flatten(),
                         "grads": {n: p.grad.clone() for n, p in ddp.module.named_parameters()}}
    # Validation switches off DDP's per-forward buffer broadcast (ranks may run different numbers of val
    # batches; tests/training/test_clip_train.py runs that case through the command line) and restores it.
    ddp = DistributedDataParallel(_model(False))
    before = ddp.will_sync_module_buffers()
    previous = set_ddp_buffer_sync(ddp, False)
    during = ddp.will_sync_module_buffers()
    set_ddp_buffer_sync(ddp, previous)
    results["buffer_sync"] = torch.tensor([before, during, ddp.will_sync_module_buffers()])
    # Uneven gathers as validation does them: 2 rows here, 3 there; then none on rank 1.
    results["gather_uneven"] = gather_rows(torch.full((2 + rank, 4), float(rank)), _all_gather, WORLD)
    results["gather_empty"] = gather_rows(torch.full((3 * (1 - rank), 4), 7.0), _all_gather, WORLD)
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


def _single_process(kind: str, bias: bool) -> tuple[torch.Tensor, dict]:
    model = _model(bias)
    images, tokens = _batch()
    loss = make_loss(kind, local_loss=False, gather_with_grad=False, rank=0, world_size=1)(*model(images, tokens))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_two_rank_ddp_loss_and_gradients_equal_single_process(tmp_path: Path):
    out_file = tmp_path / "ranks.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    results = torch.load(out_file, weights_only=True)

    for name in ("local_gather_grad", "global_gather_grad", "siglip"):
        kind, _, _, bias = CASES[name]
        loss, grads = _single_process(kind, bias)
        ranks = results[name]
        torch.testing.assert_close(ranks["losses"].mean(), loss, rtol=1e-10, atol=1e-12, msg=name)
        assert grads.keys() == ranks["grads"].keys()
        for param, grad in grads.items():
            torch.testing.assert_close(ranks["grads"][param], grad, rtol=1e-8, atol=1e-12, msg=f"{name}: {param}")

    # Control: without gradients through the gather, the local loss misses the cross-rank terms.
    loss, grads = _single_process("clip", False)
    wrong = results["local_no_grad_gather"]["grads"]
    torch.testing.assert_close(results["local_no_grad_gather"]["losses"].mean(), loss, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(wrong["visual.conv1.weight"], grads["visual.conv1.weight"], rtol=1e-3)

    # Hard-negative captions: the same identities as the plain loss.
    model = _model(False)
    images, tokens = _batch()
    negatives, mask = _negatives()
    loss = _negative_loss(model, HardNegativeClipLoss(), images, tokens, negatives, mask)
    loss.backward()
    for name in NEGATIVE_CASES:
        torch.testing.assert_close(results[name]["losses"].mean(), loss.detach(), rtol=1e-10, atol=1e-12, msg=name)
        if name == "negatives_local_no_grad_gather":  # the same loss, but gradients only through its own rows
            wrong = results[name]["grads"]["visual.conv1.weight"]
            assert not torch.allclose(wrong, model.visual.conv1.weight.grad, rtol=1e-3)
            continue
        for param, p in model.named_parameters():
            torch.testing.assert_close(results[name]["grads"][param], p.grad, rtol=1e-8, atol=1e-12,
                                       msg=f"{name}: {param}")

    expected = torch.cat([torch.zeros(2, 4), torch.ones(3, 4)])
    torch.testing.assert_close(results["gather_uneven"], expected)
    torch.testing.assert_close(results["gather_empty"], torch.full((3, 4), 7.0))
    assert results["buffer_sync"].tolist() == [True, False, True]

