"""Sampling on a subset of the training chain's steps (improved-diffusion respace.py, Nichol & Dhariwal 2021 §4).

A respaced chain keeps ᾱ at the kept steps and recomputes β_i = 1 - ᾱ_{k_i}/ᾱ_{k_{i-1}}, so the posterior
variance β̃ and the learned-range interpolation between β̃ and β stay valid on the short chain. The model still
sees the ORIGINAL step indices: :class:`~unclip.diffusion.gaussian.GaussianDiffusion` keeps a ``timestep_map``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

StepSpec = int | str | Sequence[int]


def _strided(start: int, size: int, count: int) -> list[int]:
    # improved-diffusion's evenly strided section: first and last step of the section are both kept.
    if count > size:
        raise ValueError(f"cannot take {count} steps from a section of {size}")
    if count < 1:
        raise ValueError(f"a section needs at least one step, got {count}")
    frac_stride = 1.0 if count == 1 else (size - 1) / (count - 1)
    # The stride is ACCUMULATED as in improved-diffusion (not i·stride): the float sums round differently for
    # 278 of the 1000 counts on a 1000-step chain (e.g. 39: the 20th kept step is 499 here, 500 with i·stride),
    # and parity means the same kept steps.
    steps, cur = [], 0.0
    for _ in range(count):
        steps.append(start + round(cur))
        cur += frac_stride
    return steps


def space_timesteps(num_timesteps: int, section_counts: StepSpec) -> list[int]:
    """Choose which steps of a ``num_timesteps`` chain to keep.

    :param num_timesteps: length T of the chain being respaced.
    :param section_counts: one of
        - ``int`` n: n evenly strided steps including 0 and T-1 (same as the string ``"n"``);
        - ``"ddimN"``: ``range(0, T, stride)`` with the stride that gives exactly N steps (DDIM's "uniform" skip);
        - ``"a,b,c"``: the chain cut into equal sections, a/b/c evenly strided steps in each (improved-diffusion);
        - a list/tuple of ints: the explicit step indices to keep.
    :return: sorted list of unique kept step indices in [0, T).
    :raises ValueError: for malformed specs, counts larger than the chain, or out-of-range indices.
    """
    if isinstance(section_counts, bool):
        raise TypeError("section_counts must be an int, a string or a list of step indices, not bool")
    if isinstance(section_counts, int):
        return _strided(0, num_timesteps, section_counts)
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = int(spec[len("ddim") :])
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        try:
            counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}; use an int, 'ddimN', 'a,b,c' section counts or a list"
            ) from None
        size_per, extra = divmod(num_timesteps, len(counts))
        steps: list[int] = []
        start = 0
        for i, count in enumerate(counts):
            size = size_per + (1 if i < extra else 0)
            steps += _strided(start, size, count)
            start += size
        return sorted(set(steps))
    steps = sorted({int(s) for s in section_counts})
    if not steps:
        raise ValueError("an explicit step list must not be empty")
    if steps[0] < 0 or steps[-1] >= num_timesteps:
        raise ValueError(f"step indices must lie in [0, {num_timesteps}), got {steps[0]}..{steps[-1]}")
    return steps


def respace_betas(alphas_cumprod: np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the chain that visits only ``use_timesteps``, keeping ᾱ there exactly.

    :param alphas_cumprod: float64 [T] ᾱ of the full chain.
    :param use_timesteps: sorted kept indices (from :func:`space_timesteps`).
    :return: (betas [K] float64, timestep_map [K] int64) where timestep_map[i] is the full-chain index of step i.
    """
    kept = np.asarray(sorted(use_timesteps), dtype=np.int64)
    abar = np.asarray(alphas_cumprod, dtype=np.float64)[kept]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return 1.0 - abar / abar_prev, kept


def karras_timesteps(
    alphas_cumprod: np.ndarray, n: int, sigma_max: float = 80.0, sigma_min: float | None = None, rho: float = 7.0
) -> list[int]:
    """Steps nearest (in log σ) to Karras et al. 2022 eq. 5's ρ-spaced grid, σ = √((1−ᾱ)/ᾱ).

    Meant for :func:`~unclip.diffusion.samplers.sample_heun`, whose trapezoidal step is unstable on the huge first
    σ ratio of strided cosine chains (σ ≈ 2e4 → 14 at 20 steps). Steps that round to the same index are merged,
    so fewer than ``n`` may come back.

    :param alphas_cumprod: float64 [T] ᾱ of the chain being respaced.
    :param n: number of grid points.
    :param sigma_max: largest σ (80 in EDM); clamped to the chain's range.
    :param sigma_min: smallest σ, default the chain's smallest.
    :param rho: grid curvature ρ (7 in EDM).
    :return: sorted unique step indices for :func:`respace_betas` / ``GaussianDiffusion.respace``.
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    log_sigmas = 0.5 * np.log((1.0 - ac) / ac)
    smin = np.exp(log_sigmas.min()) if sigma_min is None else sigma_min
    ramp = np.linspace(0.0, 1.0, n)
    grid = (sigma_max ** (1 / rho) + ramp * (smin ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    idx = np.abs(np.log(grid)[:, None] - log_sigmas[None, :]).argmin(axis=1)
    return sorted({int(i) for i in idx})


def logsnr_timesteps(alphas_cumprod: np.ndarray, n: int) -> list[int]:
    """The chain's steps nearest to a grid uniform in log-SNR λ = log(ᾱ/(1−ᾱ))/2, first and last step included: the
    spacing DPM-Solver uses (Lu et al. 2022 §3.3). Near t = 0 λ moves fast and nearby grid points round to the same
    step, so the grid is refined until n distinct steps remain (n − 1 where no refinement gives exactly n).

    :param alphas_cumprod: float64 [T] ᾱ of the chain being respaced.
    :param n: number of steps.
    :return: sorted unique step indices for ``GaussianDiffusion.respace``.
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    lam = 0.5 * np.log(ac / (1.0 - ac))  # [T], decreasing in t
    best: list[int] = []
    for size in range(n, 8 * n + 1):
        grid = np.linspace(lam[-1], lam[0], size)
        steps = sorted(set(np.abs(lam[:, None] - grid[None]).argmin(axis=0).tolist()))
        if len(steps) > n:
            break
        best = steps
        if len(steps) == n:
            break
    return best


SPACINGS = ("strided", "logsnr", "karras")


def spaced_timesteps(alphas_cumprod: np.ndarray, steps: StepSpec, spacing: str) -> StepSpec:
    """The kept steps for a sampling ``spacing`` policy (what ``GaussianDiffusion.respace`` takes).

    :param alphas_cumprod: float64 [T] ᾱ of the training chain.
    :param steps: the number of steps, or for "strided" any :func:`space_timesteps` spec ("ddim27", "10,10,5").
    :param spacing: "strided" (evenly strided, first and last step kept: improved-diffusion; the paper's samplers),
        "logsnr" (uniform in log-SNR: DPM-Solver's spacing, far fewer steps for the same ODE error) or "karras"
        (Karras et al. 2022's σ grid, for Heun).
    :raises ValueError: for an unknown spacing, listing the valid ones.
    """
    if spacing == "strided":
        return steps
    if spacing == "logsnr":
        return logsnr_timesteps(alphas_cumprod, int(steps))  # type: ignore[arg-type]
    if spacing == "karras":
        return karras_timesteps(alphas_cumprod, int(steps))  # type: ignore[arg-type]
    raise ValueError(f"unknown sampling spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
