"""Samplers: small pure functions over a (respaced) :class:`~unclip.diffusion.gaussian.GaussianDiffusion`.

All share one signature, k-diffusion style: ``(model, x, process, extra_args, callback, progress, *, eta,
generator, clip_denoised, dynamic_threshold)``, so a caller can pass the same options to any of them. Only DDIM
has an η: the others raise when given one (ddpm is ancestral, dpmpp_2m and heun are deterministic ODE solvers)
rather than silently sampling something other than what was asked for. ``model`` is called through ``process``
as ``model(x_t, original_timesteps, **extra_args)``; wrap it with
:func:`~unclip.diffusion.guidance.classifier_free_guidance` for guidance (samplers never branch on it).

A chain of K steps is walked from position K-1 down to 0 and then to the clean sample (ᾱ = 1), so every sampler
uses K network evaluations (Heun 2K-1) and returns the final x₀ estimate. Stochastic samplers draw all noise
from ``generator`` (which must live on ``x.device``); ``callback`` receives one dict per step:
``{"i": step number, "t": chain position, "timestep": original index, "x": new state, "pred_x0": x̂₀}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, Model

Callback = Callable[[dict[str, Any]], None]


def _positions(num_steps: int, progress: bool, reverse: bool = True) -> Iterable[int]:
    steps: Iterable[int] = range(num_steps - 1, -1, -1) if reverse else range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(list(steps))
    return steps


def _no_eta(sampler: str, eta: float | None) -> None:
    if eta is not None:
        raise ValueError(f"sampler {sampler!r} takes no eta (got eta={eta}); eta is DDIM's stochasticity "
                         f"(Song et al. 2021 eq. 16): use sampler 'ddim', or leave eta unset")


def sampler_eta(sampler: str, eta: float | None) -> float | None:
    """The η to hand sampler ``sampler`` from a stage config, where 0 is the default "no DDIM noise": DDIM gets it
    as given; the others get None for an unset or zero η and otherwise the value itself, which they refuse
    (a non-zero η with sampler ddpm is an error, not a silently different sampler)."""
    if sampler == "ddim" or (eta is not None and float(eta) != 0.0):
        return eta
    return None


def _report(callback: Callback | None, step: int, i: int, process: GaussianDiffusion, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        timestep = int(process.timestep_map[i])
        callback({"i": step, "t": i, "timestep": timestep, "x": x, "pred_x0": x0})


def ddpm_step(model: Model, x: Tensor, i: int, process: GaussianDiffusion, extra_args: Mapping[str, Any] | None,
              *, generator: torch.Generator | None, clip_denoised: bool = False,
              dynamic_threshold: float | None = None) -> tuple[Tensor, Tensor]:
    """One ancestral step from chain position i to i−1 (or to the clean sample from 0): (x_{i−1}, x̂₀).

    Shared by :func:`sample_ddpm` and RePaint (``unclip.diffusion.inpaint``), which interleaves it with
    forward jumps and known-region replacement.
    """
    p = process.model_predictions(model, x, i, extra_args, clip_denoised=clip_denoised,
                                  dynamic_threshold=dynamic_threshold)
    x0 = p["pred_x0"]
    assert x0 is not None
    mean = process.q_posterior_mean(x0, x, i)  # Ho et al. eq. 7 at x̂₀ (improved-diffusion's p_mean_variance)
    if i > 0:  # no noise on the last step, whose mean is x̂₀ (ᾱ_prev = 1)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        log_var = process.p_log_variance(i, x, p["var_output"])
        if isinstance(log_var, float):  # fixed variance: a scalar standard deviation
            mean.add_(noise, alpha=math.exp(0.5 * log_var))
        else:  # learned: log_var is a fresh tensor, so it can become the std in place
            mean.addcmul_(log_var.mul_(0.5).exp_(), noise)
    return mean, x0


def ddim_step(model: Model, x: Tensor, i: int, process: GaussianDiffusion, extra_args: Mapping[str, Any] | None,
              *, eta: float, generator: torch.Generator | None, clip_denoised: bool = False,
              dynamic_threshold: float | None = None) -> tuple[Tensor, Tensor]:
    """One DDIM step from chain position i to i−1 (Song et al. 2021 eq. 12): (x_{i−1}, x̂₀)."""
    ac, acp = process.alphas_cumprod, process.alphas_cumprod_prev
    p = process.model_predictions(model, x, i, extra_args, clip_denoised=clip_denoised,
                                  dynamic_threshold=dynamic_threshold)
    x0, eps = p["pred_x0"], p["pred_eps"]
    assert x0 is not None and eps is not None
    # eq. 16: σ_t(η) = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_prev); python floats keep x's dtype.
    sigma = eta * math.sqrt((1 - acp[i]) / (1 - ac[i]) * (1 - ac[i] / acp[i]))
    x = (x0 * math.sqrt(acp[i])).add_(eps, alpha=math.sqrt(max(1 - acp[i] - sigma**2, 0.0)))
    if sigma > 0:
        x.add_(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), alpha=sigma)
    return x, x0


@torch.no_grad()
def sample_ddpm(
    model: Model,
    x: Tensor,
    process: GaussianDiffusion,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    *,
    eta: float | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    dynamic_threshold: float | None = None,
) -> Tensor:
    """Ancestral sampling with fixed or learned variance (Ho et al. 2020 Alg. 2; Nichol & Dhariwal 2021 eq. 15).

    :param model: denoiser, called as ``model(x_t, original_timesteps, **extra_args)``.
    :param x: [N x ...] starting noise x_T.
    :param process: the (respaced) chain to walk; its ModelVarType sets the step variance.
    :param extra_args: conditioning kwargs for the model.
    :param callback: called with a dict per step (module docstring).
    :param progress: show a tqdm bar.
    :param generator: source of the per-step noise.
    :param clip_denoised: clip x̂₀ to [-1, 1] before forming the posterior mean.
    :param dynamic_threshold: Imagen dynamic-thresholding percentile (overrides clip_denoised).
    :param eta: must be None (raises otherwise): the ancestral step's variance is the process's own.
    :return: [N x ...] samples.
    """
    _no_eta("ddpm", eta)
    for step, i in enumerate(_positions(process.num_timesteps, progress)):
        x, x0 = ddpm_step(model, x, i, process, extra_args, generator=generator, clip_denoised=clip_denoised,
                          dynamic_threshold=dynamic_threshold)
        _report(callback, step, i, process, x, x0)
    return x


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: Tensor,
    process: GaussianDiffusion,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    *,
    eta: float | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    dynamic_threshold: float | None = None,
) -> Tensor:
    """DDIM with stochasticity η (Song et al. 2021 eq. 12; η = 0 is the deterministic ODE, η = 1 DDPM-like).

    :param model: denoiser, called as ``model(x_t, original_timesteps, **extra_args)``.
    :param x: [N x ...] starting noise x_T.
    :param process: the (respaced) chain to walk; a learned variance output is ignored.
    :param eta: η of eq. 16, scaling σ_t relative to the DDPM posterior standard deviation (None: 0).
    :param generator: source of the per-step noise when η > 0.
    :return: [N x ...] samples.
    """
    eta = 0.0 if eta is None else float(eta)
    for step, i in enumerate(_positions(process.num_timesteps, progress)):
        x, x0 = ddim_step(model, x, i, process, extra_args, eta=eta, generator=generator,
                          clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold)
        _report(callback, step, i, process, x, x0)
    return x


@torch.no_grad()
def ddim_invert(
    model: Model,
    x: Tensor,
    process: GaussianDiffusion,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    *,
    fixed_point_iters: int = 0,
    clip_denoised: bool = False,
    dynamic_threshold: float | None = None,
) -> Tensor:
    """DDIM inversion: run the η = 0 update of Song et al. 2021 eq. 12 forwards, image → x_T (Ramesh et al. §3).

    In y = x/√ᾱ, σ = √((1−ᾱ)/ᾱ) the DDIM step i → i−1 is y_{i−1} = y_i − (σ_i − σ_{i−1}) ε̂(x_i). Inverting it
    needs ε̂ at the unknown x_i; the standard inversion uses ε̂ at the known (x_{i−1}, i−1) (step 0 treats the
    image as position 0), which leaves an O(step) round-trip error. ``fixed_point_iters`` > 0 then re-evaluates
    the model at the current guess of x_i and solves the step for x_i again, converging to the exact inverse of
    :func:`sample_ddim` (η = 0). The update is written in ε̂ where σ_{i−1}σ_i < 1 and in x̂₀ above (y_i =
    (σ_i/σ_{i−1}) y_{i−1} − (σ_i/σ_{i−1} − 1) x̂₀), the form that contracts there (for unit-scale data). Each
    iteration costs one network evaluation per step.

    :param model: denoiser, called as ``model(x_t, original_timesteps, **extra_args)``.
    :param x: [N x ...] clean data x₀.
    :param process: the (respaced) chain; sample back with ``sample_ddim(model, x_T, process, eta=0)``.
    :param fixed_point_iters: extra refinement evaluations per step (0 = standard DDIM inversion).
    :return: [N x ...] latents x_T at the chain's last position.
    """
    ac, acp = process.alphas_cumprod, process.alphas_cumprod_prev
    for step, i in enumerate(_positions(process.num_timesteps, progress, reverse=False)):
        a_prev, a_i = math.sqrt(acp[i]), math.sqrt(ac[i])
        sig_prev, sig_i = math.sqrt((1 - acp[i]) / acp[i]), math.sqrt((1 - ac[i]) / ac[i])
        y_prev = x / a_prev
        x_i = x
        for it in range(fixed_point_iters + 1):
            p = process.model_predictions(
                model, x_i, max(i - 1, 0) if it == 0 else i, extra_args,
                clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold,
            )  # fmt: skip
            pred_x0, eps = p["pred_x0"], p["pred_eps"]
            assert pred_x0 is not None and eps is not None
            x0 = pred_x0  # a Tensor past the loop too, for the callback
            if it > 0 and sig_prev * sig_i >= 1.0:
                x_i = (y_prev * (a_i * sig_i / sig_prev)).add_(x0, alpha=-a_i * (sig_i / sig_prev - 1))
            else:
                x_i = (y_prev * a_i).add_(eps, alpha=a_i * (sig_i - sig_prev))
        x = x_i
        _report(callback, step, i, process, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model,
    x: Tensor,
    process: GaussianDiffusion,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    *,
    eta: float | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    dynamic_threshold: float | None = None,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(2M), multistep data-prediction solver on the discrete chain (Lu et al. 2022 Alg. 2).

    λ = log(α/σ) with α = √ᾱ, σ = √(1−ᾱ). The first step is first order (no history). The step from position 0
    into the clean sample (σ = 0, λ = ∞) always returns x̂₀, like DDIM's last step (the 2nd-order correction is
    undefined for h = ∞).

    :param model: denoiser, called as ``model(x_t, original_timesteps, **extra_args)``.
    :param x: [N x ...] starting noise x_T.
    :param process: the (respaced) chain; a learned variance output is ignored.
    :param lower_order_final: also take the step into position 0 at first order (Lu et al. §5's trick for few
        steps). Strided cosine chains end with a large gap in λ (e.g. 2.7 vs 0.6 before it at 20 steps), where the
        2M extrapolation weight 1/(2r) exceeds 2 and overshoots the data's spread.
    :param eta, generator: the shared signature; deterministic, so eta must be None and generator is unused.
    :return: [N x ...] samples.
    """
    _no_eta("dpmpp_2m", eta)
    ac = process.alphas_cumprod
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for step, i in enumerate(_positions(process.num_timesteps, progress)):
        p = process.model_predictions(
            model, x, i, extra_args, clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold
        )
        x0 = p["pred_x0"]
        assert x0 is not None
        if i == 0:
            x = x0
        else:
            a_s, s_s, a_t, s_t = math.sqrt(ac[i]), math.sqrt(1 - ac[i]), math.sqrt(ac[i - 1]), math.sqrt(1 - ac[i - 1])
            h = math.log(a_t / s_t) - math.log(a_s / s_s)
            if x0_prev is None or (lower_order_final and i == 1):
                d = x0
            else:
                r = h_prev / h
                d = (x0 * (1 + 1 / (2 * r))).add_(x0_prev, alpha=-1 / (2 * r))
            x = (x * (s_t / s_s)).add_(d, alpha=-a_t * math.expm1(-h))
            x0_prev, h_prev = x0, h
        _report(callback, step, i, process, x, x0)
    return x


@torch.no_grad()
def sample_heun(
    model: Model,
    x: Tensor,
    process: GaussianDiffusion,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    *,
    eta: float | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    dynamic_threshold: float | None = None,
) -> Tensor:
    """Heun's 2nd-order ODE solver on the chain's σ grid (Karras et al. 2022 Alg. 1, deterministic).

    Works on x̃ = x/√ᾱ with σ = √((1−ᾱ)/ᾱ), where dx̃/dσ = (x̃ − D(x̃; σ))/σ; the grid is the chain's σ values
    then 0 (Euler for that last step), so the model is only queried at its trained steps. 2K−1 evaluations.
    Respace with :func:`~unclip.diffusion.respace.karras_timesteps` (σ ≤ 80, ρ = 7): the trapezoidal step is
    unstable on the first σ ratio of an evenly strided cosine chain (σ ≈ 2e4 → 14 at 20 steps).

    :param model: denoiser, called as ``model(x_t, original_timesteps, **extra_args)``.
    :param x: [N x ...] starting noise x_T.
    :param process: the (respaced) chain; a learned variance output is ignored.
    :param eta, generator: the shared signature; deterministic, so eta must be None and generator is unused.
    :return: [N x ...] samples.
    """
    _no_eta("heun", eta)
    ac = process.alphas_cumprod
    sigmas = [math.sqrt((1 - a) / a) for a in ac]

    def denoise(x_ve: Tensor, i: int) -> Tensor:
        p = process.model_predictions(
            model, x_ve * math.sqrt(ac[i]), i, extra_args, clip_denoised=clip_denoised,
            dynamic_threshold=dynamic_threshold,
        )  # fmt: skip
        assert p["pred_x0"] is not None
        return p["pred_x0"]

    x = x / math.sqrt(ac[-1])
    for step, i in enumerate(_positions(process.num_timesteps, progress)):
        s_cur, s_next = sigmas[i], (sigmas[i - 1] if i > 0 else 0.0)
        x0 = denoise(x, i)
        d = (x - x0).div_(s_cur)
        x_next = torch.add(x, d, alpha=s_next - s_cur)  # Euler
        if s_next > 0:  # Heun's correction with the slope at the Euler point
            d.add_((x_next - denoise(x_next, i - 1)).div_(s_next))
            x_next = torch.add(x, d, alpha=0.5 * (s_next - s_cur))
        x = x_next
        if callback is not None:  # report the VP-space state, like the other samplers
            _report(callback, step, i, process, x * math.sqrt(ac[i - 1]) if i > 0 else x, x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "heun": sample_heun,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Sampler function by name; unknown names raise listing the valid ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    model: Model,
    shape: tuple[int, ...],
    process: GaussianDiffusion,
    sampler: str = "ddim",
    extra_args: Mapping[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> Tensor:
    """Draw x_T ~ N(0, I) from ``generator`` and run the named sampler; deterministic for a seeded generator.

    :param shape: [N x ...] output shape.
    :param sampler: a key of :data:`SAMPLERS`.
    :param kwargs: sampler options (callback, progress, eta, clip_denoised, dynamic_threshold, ...).
    :return: [N x ...] samples.
    """
    fn = get_sampler(sampler)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return fn(model, x, process, extra_args, generator=generator, **kwargs)
