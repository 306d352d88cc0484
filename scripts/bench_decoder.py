"""Base-decoder benchmark: a training step and sampling with a 24M-parameter UNet at 64px.

Our network is ``conf/model/decoder/small.yaml`` (24.4M with a 256-d embedding, widths shifted to low resolutions);
ADM's own layout at the same size (64 channels, mults 1,2,3,4, 2 blocks: 24.7M) is timed beside it. DALLE2-pytorch
is measured beside ours, at equal FLOPs, by scripts/bench_compare_ref.py (``scripts/bench.py --compare-ref``).

* ``decoder24m_train_b16`` (and ``adm24m_train_b16``): one optimiser step (forward, backward, AdamW) of the hybrid
  loss at batch 16, 64px, with the guidance drops, as ``DecoderModule`` trains; fp32, and bf16 autocast where the
  CPU or GPU supports it. Median over repeats, forward GFLOP per image, peak memory.
* ``decoder24m_sample8_<sampler><steps>``: 8 images at 64px with classifier-free guidance (one batched forward of
  16 per step) through ``sample_decoder``: DPM-Solver++(2M) with 20 steps spaced uniformly in log-SNR (our
  recommendation) and DDIM-50 evenly strided (the reference's sampler). Wall time and peak memory.

Each timed workload runs in its own spawned process; peak memory is that process's peak resident set on a CPU
(torch itself, the network, optimiser state and activations) or the CUDA allocator's peak on a GPU.
* ``solver_error_<sampler><steps>``: solver quality with the exact denoiser of the Gaussian fit to the 400 val emoji
  (or to smooth random images without the shards): RMSE of each sampler's output against a 1000-step DDIM solution
  of the same probability-flow ODE from the same noise. A trained network's own error adds to this
  alike for every sampler, so a lower solver error means equal or better quality for that many evaluations.

    python scripts/bench_decoder.py [--quick]      # prints a JSON list of {"workload", "metric", "value", "unit"}

``run(quick)`` is imported by the top-level scripts/bench.py. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import isolated, peak_memory_mib, timed  # noqa: E402

from unclip.decoder_sampling import run_sampler, sample_decoder, sampling_process  # noqa: E402
from unclip.diffusion import create_diffusion, sample_ddim  # noqa: E402
from unclip.models.unet import DecoderUNet, build_unet  # noqa: E402
from unclip.stages import DecoderInfo  # noqa: E402

SMALL = ROOT / "conf" / "model" / "decoder" / "small.yaml"
ADM_LAYOUT = dict(model_channels=64, channel_mult=[1, 2, 3, 4], num_res_blocks=2, attention_resolutions=[16, 8])
DIFFUSION = dict(steps=1000, noise_schedule="cosine", mean_type="eps", var_type="learned_range", loss_type="hybrid",
                 snr_gamma=None, vlb_weight=0.001)
# (sampler, steps, spacing): our recommendation, then the reference's DDIM-50 (evenly strided)
SAMPLERS = [("dpmpp_2m", 20, "logsnr"), ("ddim", 50, "strided")]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(device: torch.device, **overrides: Any) -> DecoderUNet:
    """``conf/model/decoder/small.yaml`` with the reference's 256-d image embedding (and any overrides)."""
    config = {**OmegaConf.to_container(OmegaConf.load(SMALL)), "clip_embed_dim": 256, **overrides}
    torch.manual_seed(0)
    net = build_unet(DecoderUNet, config, out_channels=6)
    return net.to(device).to(memory_format=torch.channels_last)  # type: ignore[return-value]


def forward_gflops(net: DecoderUNet, device: torch.device) -> float:
    """Forward FLOPs of one 64px image (torch's FLOP counter: convolutions, matmuls, attention)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 64, 64, device=device), torch.zeros(1, dtype=torch.long, device=device),
            torch.zeros(1, 256, device=device))
    return counter.get_total_flops() / 1e9


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bench_train(layout: str, bf16: bool, repeats: int) -> list[dict]:
    """Median optimiser step of ``layout`` ("decoder24m": small.yaml; "adm24m": ADM's layout) at batch 16, 64px."""
    device = _device()
    net = build(device, **(ADM_LAYOUT if layout == "adm24m" else {}))
    process = create_diffusion(**DIFFUSION)
    opt = torch.optim.AdamW(net.parameters(), lr=1.2e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(16, 3, 64, 64, device=device, generator=g) * 2 - 1
    z = F.normalize(torch.randn(16, 256, device=device, generator=g), dim=-1)
    net.train()

    def step() -> None:
        t = torch.randint(0, 1000, (16,), device=device, generator=g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = process.training_losses(net, x0, t, {"image_embed": z, **net.drop_masks(16, device, g)})["loss"]
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = timed(step, repeats, device)
    w = f"{layout}_train_b16{'_bf16' if bf16 else ''}"
    rows = [{"workload": w, "metric": "step_s", "value": round(statistics.median(times), 3), "unit": "s"},
            {"workload": w, "metric": "peak_mem", "value": round(peak_memory_mib(device)), "unit": "MiB"}]
    if not bf16:
        params = sum(p.numel() for p in net.parameters())
        rows += [{"workload": w, "metric": "params", "value": round(params / 1e6, 2), "unit": "M"},
                 {"workload": w, "metric": "fwd_gflop_per_image", "value": round(forward_gflops(net, device), 2),
                  "unit": "GFLOP"}]
    return rows


def bench_sample(sampler: str, steps: int, spacing: str) -> list[dict]:
    """8 guided samples at 64px from ``small.yaml`` (the weights do not change the cost)."""
    device = _device()
    net = build(device).eval()
    model = {**OmegaConf.to_container(OmegaConf.load(SMALL)), "clip_embed_dim": 256}  # type: ignore[dict-item]
    sampling = {"sampler": "ddim", "steps": 50, "spacing": "strided", "guidance_scale": 3.0, "eta": 0.0,
                "clip_denoised": True}
    meta = DecoderInfo(model=model, diffusion=DIFFUSION, sampling=sampling)
    z = F.normalize(torch.randn(8, 256, device=device, generator=torch.Generator(device).manual_seed(1)), dim=-1)
    _sync(device)
    start = time.perf_counter()
    sample_decoder(net, meta, z, sampler=sampler, steps=steps, spacing=spacing,
                   generator=torch.Generator(device).manual_seed(0))
    _sync(device)
    seconds = time.perf_counter() - start
    w = f"decoder24m_sample8_{sampler}{steps}_{spacing}"
    return [{"workload": w, "metric": "seconds", "value": round(seconds, 2), "unit": "s"},
            {"workload": w, "metric": "peak_mem", "value": round(peak_memory_mib(device)), "unit": "MiB"}]


def _emoji_images(n: int) -> torch.Tensor:
    """n real 64px emoji from the val shard in [-1, 1], or smooth random images when the shards are absent."""
    root = Path(os.environ.get("UNCLIP_EMOJI_ROOT", ROOT.parent / "shared" / "data" / "emoji"))
    shard = root / "val" / "00000.tar"
    if shard.is_file():
        import io
        import tarfile

        from PIL import Image

        images = []
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".png")) and len(images) < n:
                    img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB").resize((64, 64))
                    images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(64, 64, 3))
        if len(images) == n:
            return torch.stack(images).permute(0, 3, 1, 2).double() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    return F.interpolate(torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64), size=64, mode="bilinear") * 2 - 1


def exact_denoiser(data: torch.Tensor, floor: float, alphas_cumprod: torch.Tensor) -> Callable[..., torch.Tensor]:
    """ε-prediction of the exact posterior mean for x₀ ~ N(μ, Σ), the Gaussian fit to the images ``data`` [K, 3, 64,
    64]: Σ = V diag(λ) Vᵀ from their principal components plus ``floor``·I, so E[x₀ | x_t] = μ + √ᾱ Σ (ᾱΣ +
    (1 − ᾱ) I)⁻¹ (x_t − √ᾱ μ), applied per eigen-direction. The ODE then has a single basin, so the error measures
    the solver alone, over the power spectrum of real images."""
    flat = data.flatten(1)  # [K, D]
    mu = flat.mean(0)
    _, s, vh = torch.linalg.svd(flat - mu, full_matrices=False)  # vh [r, D]
    lam = s**2 / (flat.shape[0] - 1) + floor  # [r] variances along the principal directions

    def model(x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
        abar = alphas_cumprod[t].view(-1, 1)  # [N, 1]
        r = x.double().flatten(1) - abar.sqrt() * mu  # [N, D]
        coef = abar.sqrt() / (abar + (1 - abar) / lam)  # [N, r] √ᾱλ/(ᾱλ + 1 − ᾱ)
        coef_floor = abar.sqrt() / (abar + (1 - abar) / floor)  # [N, 1] in the orthogonal complement
        proj = r @ vh.T  # [N, r]
        x0 = mu + coef_floor * r + ((coef - coef_floor) * proj) @ vh
        eps = (x.double().flatten(1) - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps.view_as(x).to(x.dtype)

    return model


def bench_solver_error(samplers: list[tuple[str, int, str]], n: int) -> list[dict]:
    diffusion = dict(DIFFUSION, var_type="fixed_small", loss_type="mse")
    base = create_diffusion(**diffusion)
    model = exact_denoiser(_emoji_images(400), 1e-4, torch.as_tensor(base.alphas_cumprod))
    x_T = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = sample_ddim(model, x_T, base.respace(1000), clip_denoised=True)
    rows = []
    for sampler, steps, spacing in samplers:
        process = sampling_process(diffusion, steps, spacing)
        out = run_sampler(model, x_T, process, sampler, {}, eta=0.0, generator=None, clip_denoised=True,
                          progress=False)
        rmse = float((out - reference).square().mean().sqrt())
        rows.append({"workload": f"solver_error_{sampler}{process.num_timesteps}_{spacing}", "metric": "rmse_vs_ode",
                     "value": round(rmse, 4), "unit": "[-1,1]"})
    return rows


def run(quick: bool) -> list[dict]:
    """All decoder workloads, each timed one in a fresh process; ``quick`` times 2 training steps instead of 5 and
    solves the ODE for 4 samples instead of 16."""
    repeats = 2 if quick else 5
    rows = isolated(bench_train, "decoder24m", False, repeats)
    if bf16_supported(_device()):
        rows += isolated(bench_train, "decoder24m", True, repeats)
    rows += isolated(bench_train, "adm24m", False, repeats)
    for sampler, steps, spacing in SAMPLERS:
        rows += isolated(bench_sample, sampler, steps, spacing)
    rows += bench_solver_error(SAMPLERS + [("dpmpp_2m", 15, "logsnr"), ("dpmpp_2m", 20, "strided"),
                                           ("ddim", 20, "logsnr"), ("ddim", 250, "strided")], n=4 if quick else 16)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
