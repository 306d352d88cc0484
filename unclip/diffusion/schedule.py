"""Named beta schedules for the discrete Gaussian diffusion chain.

Schedules are float64 numpy arrays of betas. **Schedules may be added but never changed**: a trained
checkpoint is only meaningful with the exact schedule it was trained on (improved-diffusion's rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous ᾱ(t), t ∈ [0, 1], into betas (Nichol & Dhariwal 2021, eq. 17).

    :param num_diffusion_timesteps: number of betas T.
    :param alpha_bar: ᾱ as a function of t ∈ [0, 1].
    :param max_beta: cap on each beta; 0.999 avoids the singularity of the cosine schedule at t = 1.
    :return: float64 array [T] with beta_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta).
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def _linear(num_diffusion_timesteps: int) -> np.ndarray:
    # Ho et al. 2020's 1e-4..0.02 for 1000 steps, rescaled so any T gives the same ᾱ curve (improved-diffusion).
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def _cosine(num_diffusion_timesteps: int) -> np.ndarray:
    # Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t + s)/(1 + s) · π/2), s = 0.008; β ≤ 0.999.
    return betas_for_alpha_bar(
        num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2, max_beta=0.999
    )


_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {"linear": _linear, "cosine": _cosine}


def list_beta_schedules() -> list[str]:
    """Names accepted by :func:`get_named_beta_schedule`."""
    return sorted(_SCHEDULES)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int = 1000) -> np.ndarray:
    """Betas of a named schedule.

    :param schedule_name: one of :func:`list_beta_schedules` ("cosine", "linear").
    :param num_diffusion_timesteps: chain length T (the paper uses 1000 for every stage).
    :return: float64 array [T] of betas in (0, 1).
    :raises ValueError: for an unknown name, listing the valid ones.
    """
    if schedule_name not in _SCHEDULES:
        raise ValueError(f"unknown beta schedule {schedule_name!r}; valid: {list_beta_schedules()}")
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    return _SCHEDULES[schedule_name](num_diffusion_timesteps)
