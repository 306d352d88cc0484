"""DALLE2-pytorch beside ours, measured in the same process on the same batches: ``--compare-ref``.

    scripts/bench_env.sh                                     # once: .bench-env/ with pinned dalle2-pytorch
    .bench-env/bin/python scripts/bench.py --compare-ref --out ref.json

Every row pair is at equal work, and states its FLOPs and achieved GFLOP/s beside the machine's measured ceiling
(``machine/matmul_ceiling``: a square ``torch.mm`` loop at the benchmark's own thread count, fp32, and bf16 where
the CPU has it). FLOPs are counted, never derived by formula: ``torch.utils.flop_counter.FlopCounterMode`` over
one forward of each network (matmuls, convolutions, attention; elementwise ops are not counted). Convention: a
training step costs 3x its forward FLOPs (forward + a backward of twice the forward), times the batch.

* ``decoder_step/*``: one AdamW step (hybrid loss, learned variance, guidance drops) of the emoji-sized base
  decoder at 32px: DALLE2-pytorch ``Decoder(Unet(dim=64, dim_mults=(1,2,4)))`` vs ours
  ``conf/model/decoder/tiny.yaml`` with the caption encoder off (both condition on a 128-d z_i only); then
  DALLE2-pytorch at matched FLOPs: its width searched so its forward FLOPs per image come nearest ours (the row
  ``flops_gap_vs_ours`` says how near: within 5% is the aim).
* ``prior_step/*``: one AdamW step of the 256-wide, 9-block prior at batch 64 with the same 81 sequence positions
  on both sides (77 dense caption tokens + 4; theirs always runs ``max_text_len`` + 4), then each side's normal use:
  ours on captions of 5-24 real tokens (it cuts the batch to its longest caption), theirs at 77 regardless.
* ``decoder_sample/*``: guided samples (scale 3) from the two equal-work decoders: DDIM-50 on both sides, then
  each side's recommended sampler: ours DPM-Solver++(2M) 20 steps in log-SNR (conf/experiment/emoji_decoder_tiny),
  theirs the ``Decoder`` default (ancestral sampling over all 1000 steps; skipped by ``--quick``).

``--quick`` shrinks the batches and the DDIM step count (the workload names say which) to prove the suite runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:  # first: a missing reference fails before anything heavy is imported
    from dalle2_pytorch import Decoder, DiffusionPrior, DiffusionPriorNetwork, Unet
except ImportError as err:  # the reference lives in the bench env only, never a project dependency
    raise ImportError("compare_ref needs DALLE2-pytorch: run scripts/bench_env.sh, then run scripts/bench.py with "
                      ".bench-env/bin/python") from err

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import closest, count_flops, matmul_ceiling_rows, row, step_rows, suite_main, timed  # noqa: E402
from bench_prior import BENCH_MODEL, conditioning  # noqa: E402

from unclip.decoder_sampling import sample_decoder  # noqa: E402
from unclip.diffusion import create_diffusion  # noqa: E402
from unclip.models.prior import PriorTransformer  # noqa: E402
from unclip.models.unet import DecoderUNet, build_unet  # noqa: E402
from unclip.stages import DecoderInfo  # noqa: E402

TINY = ROOT / "conf" / "model" / "decoder" / "tiny.yaml"
EMOJI_DECODER = ROOT / "conf" / "experiment" / "emoji_decoder_tiny.yaml"
SIDE, EMBED = 32, 128  # emoji base decoder: 32px, tiny CLIP's 128-d z_i
REF_UNET = dict(dim=64, dim_mults=(1, 2, 4))  # the equal-work reference
DIFFUSION = dict(steps=1000, noise_schedule="cosine", mean_type="eps", var_type="learned_range", loss_type="hybrid",
                 snr_gamma=None, vlb_weight=0.001)
GUIDANCE = 3.0


# ---- decoder --------------------------------------------------------------------------------------------------

def ours_config(**overrides: Any) -> dict:
    return {**OmegaConf.to_container(OmegaConf.load(TINY)), "text": None, **overrides}  # type: ignore[dict-item]


def ours_decoder(**overrides: Any) -> DecoderUNet:
    torch.manual_seed(0)
    return build_unet(DecoderUNet, ours_config(**overrides), out_channels=6)  # type: ignore[return-value]


def ref_decoder(dim: int = REF_UNET["dim"], resnet_groups: int = 8) -> Any:
    torch.manual_seed(0)
    unet = Unet(dim=dim, dim_mults=REF_UNET["dim_mults"], image_embed_dim=EMBED, cond_on_image_embeds=True,
                cond_on_text_encodings=False, channels=3, resnet_groups=resnet_groups)
    return Decoder(unet=unet, image_size=SIDE, timesteps=1000, image_cond_drop_prob=0.1, text_cond_drop_prob=0.5,
                   loss_type="l2", learned_variance=True)


def ours_fwd_flops(net: DecoderUNet) -> float:
    with torch.no_grad():
        return count_flops(lambda: net(torch.zeros(1, 3, SIDE, SIDE), torch.zeros(1, dtype=torch.long),
                                       F.normalize(torch.randn(1, EMBED), dim=-1)))


def ref_fwd_flops(decoder: Any) -> float:
    unet = decoder.unets[0]
    with torch.no_grad():
        return count_flops(lambda: unet(torch.zeros(1, 3, SIDE, SIDE), torch.zeros(1, dtype=torch.long),
                                        image_embed=F.normalize(torch.randn(1, EMBED), dim=-1)))


def matched_ref_dim(target: float) -> tuple[int, float]:
    """DALLE2-pytorch's ``Unet`` width (multiples of 4, GroupNorm groups of 4) whose forward FLOPs per image are
    nearest ``target`` (ours): (dim, relative gap). Their width moves in finer steps than ours (our attention
    heads are 32 channels wide), so theirs is the side matched."""
    flops = {dim: ref_fwd_flops(ref_decoder(dim, resnet_groups=4)) for dim in range(48, 81, 4)}
    return closest(flops, target)


def decoder_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, SIDE, SIDE, generator=g), F.normalize(torch.randn(batch, EMBED, generator=g), dim=-1)


def time_ours_step(net: DecoderUNet, images: torch.Tensor, z: torch.Tensor, repeats: int) -> list[float]:
    process = create_diffusion(**DIFFUSION)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x0, n = images * 2 - 1, images.shape[0]
    net.train()

    def step() -> None:
        t = torch.randint(0, 1000, (n,), generator=g)
        loss = process.training_losses(net, x0, t, {"image_embed": z, **net.drop_masks(n, "cpu", g)})["loss"]
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, repeats, torch.device("cpu"))


def time_ref_step(decoder: Any, images: torch.Tensor, z: torch.Tensor, repeats: int) -> list[float]:
    opt = torch.optim.AdamW(decoder.unets[0].parameters(), lr=1e-4)
    decoder.train()

    def step() -> None:
        decoder(images, image_embed=z, unet_number=1).backward()  # images in [0, 1]: it normalises them
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, repeats, torch.device("cpu"))


def bench_decoder_steps(batch: int, repeats: int) -> tuple[list[dict], Any, DecoderUNet]:
    images, z = decoder_batch(batch)
    ref, ours = ref_decoder(), ours_decoder()
    ref_f, ours_f = ref_fwd_flops(ref), ours_fwd_flops(ours)
    n_ref = sum(p.numel() for p in ref.unets[0].parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    tag = f"{SIDE}px_b{batch}"
    rows = step_rows(f"decoder_step/equal_preset/{tag}/dalle2_unet64_124", n_ref, ref_f, batch,
                     time_ref_step(ref, images, z, repeats))
    rows += step_rows(f"decoder_step/equal_preset/{tag}/ours_tiny_notext", n_ours, ours_f, batch,
                      time_ours_step(ours, images, z, repeats))
    dim, gap = matched_ref_dim(ours_f)
    matched = ref_decoder(dim, resnet_groups=4)
    rows += step_rows(f"decoder_step/matched_flops/{tag}/dalle2_unet{dim}_124", sum(p.numel() for p in
                      matched.unets[0].parameters()), ref_fwd_flops(matched), batch,
                      time_ref_step(matched, images, z, repeats), {"flops_gap_vs_ours": round(gap, 4)})
    return rows, ref, ours


# ---- decoder sampling -----------------------------------------------------------------------------------------

def sampling_rows(workload: str, per_step_flops: float, steps: int, seconds: float) -> list[dict]:
    total = per_step_flops * steps / 1e9
    return [row(workload, "steps", steps, "network steps"),
            row(workload, "gflop_per_step", round(per_step_flops / 1e9, 3), "GFLOP (guided: 2 forwards)"),
            row(workload, "seconds", round(seconds, 2), "s"),
            row(workload, "achieved_gflop_s", round(total / seconds, 1), "GFLOP/s")]


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_sampling(ref: Any, ours: DecoderUNet, batch: int, ddim_steps: int, quick: bool) -> list[dict]:
    ref.eval(), ours.eval()
    _, z = decoder_batch(batch)
    unet = ref.unets[0]
    with torch.no_grad():
        ref_step = count_flops(lambda: unet.forward_with_cond_scale(
            torch.zeros(batch, 3, SIDE, SIDE), torch.zeros(batch, dtype=torch.long), image_embed=z,
            cond_scale=GUIDANCE))
        ours_step = count_flops(lambda: ours(torch.zeros(2 * batch, 3, SIDE, SIDE),
                                             torch.zeros(2 * batch, dtype=torch.long), torch.cat([z, z])))
    info = DecoderInfo(model=ours_config(), diffusion=DIFFUSION, sampling={
        "sampler": "ddim", "steps": ddim_steps, "spacing": "strided", "guidance_scale": GUIDANCE, "eta": 0.0,
        "clip_denoised": True})
    preset = OmegaConf.load(EMOJI_DECODER).module.sampling

    def ours_run(sampler: str, steps: int, spacing: str) -> float:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return _seconds(lambda: sample_decoder(ours, info, z, sampler=sampler, steps=steps, spacing=spacing,
                                                   generator=gen))

    def ref_run(steps: int | None) -> float:
        ref.sample_timesteps = (steps,)  # fewer than the 1000 training steps: its DDIM loop
        torch.manual_seed(0)
        with torch.no_grad():
            return _seconds(lambda: ref.sample(image_embed=z, cond_scale=GUIDANCE))

    tag = f"b{batch}_guided{GUIDANCE:g}"
    rows = sampling_rows(f"decoder_sample/ddim{ddim_steps}/{tag}/dalle2", ref_step, ddim_steps, ref_run(ddim_steps))
    rows += sampling_rows(f"decoder_sample/ddim{ddim_steps}/{tag}/ours", ours_step, ddim_steps,
                          ours_run("ddim", ddim_steps, "strided"))
    rows += sampling_rows(f"decoder_sample/recommended/{tag}/ours_{preset.sampler}{preset.steps}_{preset.spacing}",
                          ours_step, int(preset.steps), ours_run(preset.sampler, int(preset.steps), preset.spacing))
    if not quick:
        rows += sampling_rows(f"decoder_sample/recommended/{tag}/dalle2_ddpm1000", ref_step, 1000, ref_run(None))
    return rows


# ---- prior ----------------------------------------------------------------------------------------------------

def time_ours_prior(model: PriorTransformer, cond: dict, batch: int, repeats: int) -> list[float]:
    from unclip.training.optim import build_optimizer

    process = create_diffusion(steps=1000, noise_schedule="cosine", mean_type="x0", loss_type="mse")
    opt = build_optimizer(lambda groups: torch.optim.AdamW(groups, lr=1.1e-4, weight_decay=6e-2), model, ())
    x0 = model.scale(F.normalize(torch.randn(batch, BENCH_MODEL["embed_dim"]), dim=-1))
    model.train()

    def step() -> None:
        t = torch.randint(0, 1000, (batch,))
        loss = process.training_losses(model, x0, t, {**cond, "cond_drop_mask": torch.rand(batch) < 0.1})["loss"]
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, repeats, torch.device("cpu"), warmup=2)


def time_ref_prior(prior: Any, cond: dict, batch: int, repeats: int) -> list[float]:
    opt = torch.optim.AdamW(prior.net.parameters(), lr=1.1e-4, weight_decay=6e-2)
    image_embed = F.normalize(torch.randn(batch, BENCH_MODEL["embed_dim"]), dim=-1)
    prior.train()

    def step() -> None:
        prior(text_embed=cond["text_embed"], image_embed=image_embed.clone(),
              text_encodings=cond["text_tokens"] * cond["text_mask"][..., None]).backward()  # zeros = padding
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, repeats, torch.device("cpu"), warmup=2)


def prior_fwd_flops(ref_net: Any, ours: PriorTransformer, used: int) -> tuple[float, float]:
    """Forward FLOPs of one item: theirs always at ``max_text_len`` positions, ours at ``used`` caption tokens."""
    one = conditioning(1, (used, used), torch.device("cpu"))
    x, t = torch.randn(1, BENCH_MODEL["embed_dim"]), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        ref_f = count_flops(lambda: ref_net(x, t, text_embed=one["text_embed"], text_encodings=one["text_tokens"]))
        ours_f = count_flops(lambda: ours(x, t, one["text_embed"], one["text_tokens"][:, :used],
                                          one["text_mask"][:, :used]))
    return ref_f, ours_f


def bench_prior(batch: int, repeats: int) -> list[dict]:
    ctx = BENCH_MODEL["context_length"]
    torch.manual_seed(0)
    net = DiffusionPriorNetwork(dim=BENCH_MODEL["width"], depth=BENCH_MODEL["depth"], heads=BENCH_MODEL["heads"],
                                dim_head=BENCH_MODEL["width"] // BENCH_MODEL["heads"], ff_mult=4,
                                num_timesteps=1000, max_text_len=ctx)
    ref = DiffusionPrior(net, image_embed_dim=BENCH_MODEL["embed_dim"], timesteps=1000, cond_drop_prob=0.1,
                         loss_type="l2", condition_on_text_encodings=True)
    torch.manual_seed(0)
    ours = PriorTransformer(**BENCH_MODEL)
    n_ref, n_ours = sum(p.numel() for p in net.parameters()), sum(p.numel() for p in ours.parameters())
    rows = []
    for name, lengths in (("equal_positions", (ctx, ctx)), ("own_use_captions5to24", (5, 24))):
        cond = conditioning(batch, lengths, torch.device("cpu"))
        used = int(cond["text_mask"].sum(1).max())  # ours cuts the batch to its longest caption
        ref_f, ours_f = prior_fwd_flops(net, ours, used)
        tag = f"prior_step/{name}/b{batch}"
        rows += step_rows(f"{tag}/dalle2", n_ref, ref_f, batch, time_ref_prior(ref, cond, batch, repeats),
                          {"positions": ctx + 4})
        rows += step_rows(f"{tag}/ours", n_ours, ours_f, batch, time_ours_prior(ours, cond, batch, repeats),
                          {"positions": used + 4})
    return rows


def run(quick: bool = False) -> list[dict]:
    torch.set_grad_enabled(True)
    rows = matmul_ceiling_rows(seconds=0.5 if quick else 3.0)
    repeats = 1 if quick else 5
    decoder_rows, ref, ours = bench_decoder_steps(4 if quick else 32, repeats)
    rows += decoder_rows
    rows += bench_prior(8 if quick else 64, repeats)
    rows += bench_sampling(ref, ours, 1 if quick else 8, 5 if quick else 50, quick)
    return rows


if __name__ == "__main__":
    sys.exit(suite_main(run, __doc__))
