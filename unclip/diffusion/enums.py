"""Modes of the diffusion process, as Enums (config strings are converted once, in create_diffusion)."""

from __future__ import annotations

import enum
from typing import Any


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    EPSILON = "eps"  # the noise ε (Ho et al. 2020)
    START_X = "x0"  # the clean sample x₀ (the unCLIP prior, Ramesh et al. 2022 §2.2)
    VELOCITY = "v"  # v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022 §4)


class ModelVarType(enum.Enum):
    """Variance of p(x_{t-1} | x_t)."""

    FIXED_SMALL = "fixed_small"  # β̃_t, the posterior variance
    FIXED_LARGE = "fixed_large"  # β_t (β̃_1 at t = 0, as improved-diffusion)
    LEARNED_RANGE = "learned_range"  # exp(v' log β + (1 − v') log β̃), v' = (v+1)/2 (Nichol & Dhariwal eq. 15)


class LossType(enum.Enum):
    MSE = "mse"  # (optionally min-SNR weighted) MSE on the predicted quantity
    HYBRID = "hybrid"  # MSE + λ·T·L_t with a stop-gradient mean, λ = vlb_weight (Nichol & Dhariwal eq. 16)
    KL = "kl"  # the VLB term L_t alone (trains mean and variance)


def parse_enum(enum_cls: type[enum.Enum], value: str | enum.Enum) -> Any:
    """Convert a config string to ``enum_cls``; unknown names raise listing the valid ones."""
    if isinstance(value, enum_cls):
        return value
    valid = [m.value for m in enum_cls]
    if value not in valid:
        raise ValueError(f"unknown {enum_cls.__name__} {value!r}; valid: {valid}")
    return enum_cls(value)
