"""Corruptions of the upsamplers' conditioning image, applied during training only (Ramesh et al. 2022 §2.1).

* :class:`GaussianBlur`: the first upsampler's corruption (64→256: kernel 3, σ 0.6; as Saharia et al. 2022 do).
* :class:`BSRDegradation`: the second's (256→1024), after BSRGAN (Zhang et al. 2021, "Designing a Practical
  Degradation Model for Deep Blind Image Super-Resolution" §3): Gaussian blur, down-and-up resizing with a random
  interpolation, Gaussian noise and JPEG compression, each with its own probability, in a random order.
  Simplified: axis-aligned (not rotated) anisotropic blur kernels, no camera-sensor noise, one JPEG pass.
* :func:`noise_augment`: Imagen's noise conditioning augmentation (Saharia et al. 2022 §2.5): the low-res image
  noised to a level s with the cosine forward process; the upsampler is told s.
* :func:`resize`, :func:`downsample`, :func:`upsample`, :func:`paired_random_crop`: the resizing and cropping of
  training pairs (and :func:`resize` of any [-1, 1] image).

Images are [N, C, H, W] in [-1, 1]; every random draw comes from the given ``torch.Generator`` (on x's device).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Antialiased bicubic resize of [N, C, H, W] to ``size`` (a side, or (height, width)), clamped to [-1, 1];
    x itself when it already has that size. The one resize of [-1, 1] images: training pairs' low-res side, the
    edit cascade's per-stage inputs, the edit evaluation's crops."""
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(-1, 1)


def downsample(x: Tensor, size: int) -> Tensor:
    """The low-res side of a training pair: [N, C, H, W] → [N, C, size, size] by :func:`resize`."""
    return resize(x, size)


def upsample(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bicubic resize of [N, C, h, w] up to ``size``, clamped to [-1, 1] (the upsamplers' conditioning input
    and the bicubic baseline they are measured against). Not :func:`resize`: torch's antialiased bicubic uses
    another kernel (a = -0.5, PIL's) than plain bicubic (a = -0.75) even when enlarging, and the upsamplers are
    trained on this one."""
    size = (size, size) if isinstance(size, int) else size
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp_(-1, 1)


def _uniform(lo_hi: Sequence[float], n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def _gaussian_taps(sigma: Tensor, kernel_size: int) -> Tensor:
    """[N] standard deviations → [N, k] normalised 1-D Gaussian taps."""
    r = torch.arange(kernel_size, device=sigma.device, dtype=torch.float32) - (kernel_size - 1) / 2
    taps = torch.exp(-(r[None] ** 2) / (2 * sigma.float()[:, None].clamp(min=1e-3) ** 2))
    return taps / taps.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, kernel_size: int, sigma_x: Tensor, sigma_y: Tensor | None = None) -> Tensor:
    """Separable Gaussian blur with a per-example (optionally anisotropic, axis-aligned) σ, reflect padding.

    :param x: [N, C, H, W].
    :param kernel_size: odd tap count.
    :param sigma_x: [N] horizontal σ in pixels.
    :param sigma_y: [N] vertical σ (None: isotropic).
    :return: [N, C, H, W].
    """
    if kernel_size % 2 == 0:
        raise ValueError(f"blur kernel_size must be odd, got {kernel_size}")
    n, c, h, w = x.shape
    pad = kernel_size // 2
    tx = _gaussian_taps(sigma_x, kernel_size).to(x.dtype).repeat_interleave(c, dim=0)  # [N·C, k]
    ty = tx if sigma_y is None else _gaussian_taps(sigma_y, kernel_size).to(x.dtype).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")  # [1, N·C, H+2p, W+2p]
    y = F.conv2d(y, tx[:, None, None, :], groups=n * c)  # [1, N·C, H+2p, W]
    y = F.conv2d(y, ty[:, None, :, None], groups=n * c)  # [1, N·C, H, W]
    return y.view(n, c, h, w)


class GaussianBlur:
    """Fixed isotropic Gaussian blur (the 64→256 upsampler's corruption: kernel 3, σ 0.6).

    :param kernel_size: odd tap count.
    :param sigma: standard deviation in pixels.
    """

    def __init__(self, kernel_size: int, sigma: float):
        if sigma <= 0:
            raise ValueError(f"blur sigma must be > 0, got {sigma}")
        self.kernel_size, self.sigma = kernel_size, sigma

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """:param x: [N, C, H, W] in [-1, 1]. :return: blurred [N, C, H, W]."""
        sigma = torch.full((x.shape[0],), self.sigma, device=x.device)
        return gaussian_blur(x, self.kernel_size, sigma)


def jpeg(x: Tensor, quality: Sequence[int]) -> Tensor:
    """Round-trip each image through JPEG (Pillow's libjpeg, 4:2:0 chroma) at its own quality, on the CPU.

    :param x: [N, 3, H, W] in [-1, 1].
    :param quality: N qualities in [1, 100].
    :return: [N, 3, H, W] in [-1, 1], on x's device.
    """
    pixels = ((x.detach().float().cpu() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    out = []
    for img, q in zip(pixels.permute(0, 2, 3, 1).numpy(), quality, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=int(q))
        out.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 127.5 - 1


class BSRDegradation:
    """BSRGAN-style random degradation (Zhang et al. 2021 §3), output at the input's size.

    :param blur_prob: probability of a Gaussian blur.
    :param blur_kernel: odd blur tap count.
    :param blur_sigma: [lo, hi] σ range in pixels.
    :param anisotropic_prob: probability that a blur draws separate horizontal and vertical σ.
    :param resize_prob: probability of resizing down by a factor in ``resize_scale`` and back up, each way with
        a random choice of bilinear, bicubic or area interpolation.
    :param resize_scale: [lo, hi] scale range (< 1).
    :param noise_prob: probability of additive Gaussian noise.
    :param noise_sigma: [lo, hi] noise σ in 8-bit levels (BSRGAN: 1-25).
    :param jpeg_prob: probability of JPEG compression.
    :param jpeg_quality: [lo, hi] quality range (BSRGAN: 30-95).
    :param shuffle: apply blur, resize and noise in a random order per batch (BSRGAN's shuffled order); JPEG last.
    """

    def __init__(self, blur_prob: float, blur_kernel: int, blur_sigma: Sequence[float], anisotropic_prob: float,
                 resize_prob: float, resize_scale: Sequence[float], noise_prob: float, noise_sigma: Sequence[float],
                 jpeg_prob: float, jpeg_quality: Sequence[int], shuffle: bool):
        for name, p in (("blur_prob", blur_prob), ("anisotropic_prob", anisotropic_prob),
                        ("resize_prob", resize_prob), ("noise_prob", noise_prob), ("jpeg_prob", jpeg_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"BSRDegradation {name} must be in [0, 1], got {p}")
        if not 0.0 < resize_scale[0] <= resize_scale[1] <= 1.0:
            raise ValueError(f"BSRDegradation resize_scale must satisfy 0 < lo <= hi <= 1, got {list(resize_scale)}")
        self.blur_prob, self.blur_kernel, self.blur_sigma = blur_prob, blur_kernel, list(blur_sigma)
        self.anisotropic_prob = anisotropic_prob
        self.resize_prob, self.resize_scale = resize_prob, list(resize_scale)
        self.noise_prob, self.noise_sigma = noise_prob, list(noise_sigma)
        self.jpeg_prob, self.jpeg_quality = jpeg_prob, [int(q) for q in jpeg_quality]
        self.shuffle = shuffle

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """:param x: [N, 3, H, W] in [-1, 1]. :return: degraded [N, 3, H, W] in [-1, 1]."""
        ops = [self._blur, self._resize, self._noise]
        if self.shuffle:
            ops = [ops[int(i)] for i in torch.randperm(3, generator=generator, device=x.device)]
        for op in ops:
            x = op(x, generator)
        chosen = torch.rand(x.shape[0], generator=generator, device=x.device) < self.jpeg_prob
        if chosen.any():
            lo, hi = self.jpeg_quality
            quality = torch.randint(lo, hi + 1, (int(chosen.sum()),), generator=generator, device=x.device)
            x = x.clone()
            x[chosen] = jpeg(x[chosen], quality.tolist())
        return x.clamp(-1, 1)

    def _chosen(self, x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
        return torch.rand(x.shape[0], generator=generator, device=x.device) < p  # [N] bool

    def _blur(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        n = x.shape[0]
        sx = _uniform(self.blur_sigma, n, generator, x.device)
        sy = torch.where(self._chosen(x, self.anisotropic_prob, generator),
                         _uniform(self.blur_sigma, n, generator, x.device), sx)
        blurred = gaussian_blur(x, self.blur_kernel, sx, sy)
        return torch.where(self._chosen(x, self.blur_prob, generator)[:, None, None, None], blurred, x)

    def _resize(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        chosen = self._chosen(x, self.resize_prob, generator)
        scales = _uniform(self.resize_scale, x.shape[0], generator, x.device)
        modes = torch.randint(0, 3, (x.shape[0], 2), generator=generator, device=x.device)
        names = ("bilinear", "bicubic", "area")
        out = x.clone()
        h, w = x.shape[-2:]
        for i in torch.nonzero(chosen).flatten().tolist():
            small = (max(1, round(h * float(scales[i]))), max(1, round(w * float(scales[i]))))
            y = _interpolate(x[i : i + 1], small, names[int(modes[i, 0])])
            out[i : i + 1] = _interpolate(y, (h, w), names[int(modes[i, 1])])
        return out

    def _noise(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        sigma = _uniform(self.noise_sigma, x.shape[0], generator, x.device) * (2.0 / 255.0)  # 8-bit → [-1, 1]
        sigma = sigma * self._chosen(x, self.noise_prob, generator)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + sigma.to(x.dtype)[:, None, None, None] * noise


def _interpolate(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=size[0] < x.shape[-2])


def noise_augment(x: Tensor, level: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Imagen's noise conditioning augmentation (Saharia et al. 2022 §2.5): √ᾱ(s)·x + √(1−ᾱ(s))·ε with the cosine
    schedule ᾱ(s) = cos²(πs/2), so s = 0 leaves x unchanged and s = 1 is pure noise.

    :param x: [N, C, H, W] low-res image in [-1, 1].
    :param level: [N] augmentation levels s in [0, 1].
    :return: [N, C, H, W] augmented image.
    """
    alpha = torch.cos(level.float() * (math.pi / 2)).to(x.dtype)[:, None, None, None]  # √ᾱ(s)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return alpha * x + (1 - alpha**2).clamp(min=0).sqrt() * noise


def paired_random_crop(a: Tensor, b: Tensor, size: int,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The same random ``size``×``size`` window of two aligned batches, drawn per example.

    :param a, b: [N, C_a, H, W], [N, C_b, H, W].
    :return: ([N, C_a, size, size], [N, C_b, size, size]).
    """
    n, _, h, w = a.shape
    if b.shape[0] != n or b.shape[-2:] != (h, w):
        raise ValueError(f"paired crop needs aligned batches, got {tuple(a.shape)} and {tuple(b.shape)}")
    if size > min(h, w):
        raise ValueError(f"crop size {size} exceeds the image size {h}x{w}")
    top = torch.randint(0, h - size + 1, (n,), generator=generator, device=a.device).tolist()
    left = torch.randint(0, w - size + 1, (n,), generator=generator, device=a.device).tolist()
    crops_a = [a[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(zip(top, left, strict=True))]
    crops_b = [b[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(zip(top, left, strict=True))]
    return torch.stack(crops_a), torch.stack(crops_b)
