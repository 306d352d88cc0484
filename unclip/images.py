"""Image conversions at the edges of the pipeline: user inputs in, PNGs, grids and output types out.

Inside unclip images are float tensors [N, 3, H, W] in [-1, 1]. Outputs are quantised exactly as a saved PNG is
(``round((x + 1) · 127.5)``), so metrics computed on returned images equal metrics on the written files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

OUTPUT_TYPES = ("pil", "np", "pt")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255], rounded exactly as when saving a PNG."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> RGB PIL images."""
    arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arrays]


def to_output(images: torch.Tensor, output_type: str) -> Any:
    """Convert [N, 3, H, W] images in [-1, 1] to the requested type.

    :param output_type: "pil" (list of RGB images), "np" (float32 [N, H, W, 3] in [0, 1]) or "pt" (float32
        [N, 3, H, W] in [0, 1], on the images' device); all three quantised to 8 bits like a PNG.
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "pil":
        return to_pil(images)
    quantised = to_uint8(images).float() / 255.0
    if output_type == "pt":
        return quantised
    return quantised.permute(0, 2, 3, 1).cpu().numpy()


def _one_image(image: Any) -> torch.Tensor:
    """One image as [3, H, W] float in [-1, 1]."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"numpy images must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor images must be [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
        return image.float()
    raise TypeError(f"unsupported image type {type(image).__name__}: give a path, PIL image, uint8 array or tensor")


def load_images(images: Any) -> torch.Tensor:
    """User images -> [N, 3, H, W] float in [-1, 1] (all the same size).

    :param images: a path, PIL image, uint8 [H, W, 3] array or [3, H, W] tensor in [-1, 1]; a list of those; or an
        [N, 3, H, W] tensor in [-1, 1].
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return images.float()
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    tensors = [_one_image(i) for i in items]
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"images of different sizes in one batch: {sorted(sizes)}")
    return torch.stack(tensors)


def load_mask(mask: Any) -> torch.Tensor:
    """A user mask -> [1, 1, H, W] float (1 = generate, 0 = keep).

    :param mask: a path or PIL image (read as grayscale, white = generate, thresholded at 128), a [H, W] array or
        tensor, or a tensor of any shape ``unclip.diffusion.inpaint.validate_mask`` takes. Arrays and tensors are
        not thresholded: a non-binary one is refused when the edit validates it.
    """
    if isinstance(mask, (str, Path)):
        with Image.open(mask) as opened:
            mask = opened.convert("L")
    if isinstance(mask, Image.Image):
        return torch.from_numpy((np.asarray(mask.convert("L")) >= 128).astype(np.float32))[None, None]
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask.astype(np.float32))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"unsupported mask type {type(mask).__name__}: give a path, PIL image, array or tensor")
    mask = mask.float()
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    return mask


def image_grid(images: torch.Tensor, nrow: int) -> Image.Image:
    """A grid of [N, 3, H, W] images in [-1, 1], ``nrow`` per row, 2px white padding."""
    grid = make_grid(to_uint8(images).cpu().float(), nrow=max(1, nrow), padding=2, pad_value=255)
    return Image.fromarray(grid.to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")


def save_pngs(images: torch.Tensor, directory: Path, names: Sequence[str]) -> list[Path]:
    """Write each image losslessly as ``directory/<name>.png``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, name in zip(to_pil(images), names, strict=True):
        path = directory / f"{name}.png"
        image.save(path)
        paths.append(path)
    return paths
