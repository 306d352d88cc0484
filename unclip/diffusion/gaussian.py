"""The discrete Gaussian diffusion process: forward marginals, posteriors, parameterisations and training losses.

Follows improved-diffusion's gaussian_diffusion.py (Ho et al. 2020; Nichol & Dhariwal 2021), minus the samplers,
which live in samplers.py. **The process never owns the network**: every method that needs one takes the model
callable and a conditioning dict ``extra_args``, and calls it as::

    model(x_t, timesteps, **extra_args) -> raw output

``x_t`` is [N x ...] (vectors [N, D] for the prior, images [N, C, H, W] for the decoder); ``timesteps`` is an
int64 tensor [N] in the ORIGINAL training chain's index space (0..999), also on a respaced chain: the process maps
its own indices through ``timestep_map`` (improved-diffusion's _WrappedModel). The raw output has the shape of
``x_t`` (the eps, x0 or v prediction), or for ModelVarType.LEARNED_RANGE twice the channels on dim 1: the
prediction, then v ∈ [-1, 1] interpolating the log-variance between β̃_t (v = -1) and β_t (v = +1).

Schedule arrays are float64 numpy; they are cast to the data's dtype when extracted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .enums import LossType, ModelMeanType, ModelVarType
from .losses import discretized_gaussian_log_likelihood, mean_flat, min_snr_weight, normal_kl
from .respace import StepSpec, respace_betas, space_timesteps

Model = Callable[..., Tensor]
# Steps of this chain: an int64 tensor [N], or one int shared by the whole batch (what samplers pass; then
# schedule coefficients are python floats, which saves an index, a cast and a broadcast per coefficient).
Steps = Tensor | int


def threshold_x0(x0: Tensor, clip_denoised: bool = False, dynamic_threshold: float | None = None) -> Tensor:
    """Clip a predicted x₀ to [-1, 1], or apply Imagen's dynamic thresholding (Saharia et al. 2022 §2.3).

    :param x0: [N x ...] predicted clean sample.
    :param clip_denoised: static clipping to [-1, 1].
    :param dynamic_threshold: percentile p ∈ (0, 1): s = max(1, quantile_p(|x₀|)) per example, x₀ ← clip(x₀, ±s)/s.
    :return: [N x ...] processed x₀.
    """
    if dynamic_threshold is not None:
        s = torch.quantile(x0.reshape(x0.shape[0], -1).abs().float(), dynamic_threshold, dim=1)
        s = s.clamp(min=1.0).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s
    if clip_denoised:
        return x0.clamp(-1.0, 1.0)
    return x0


def _lin(a: Tensor | float, x: Tensor, b: Tensor | float, y: Tensor) -> Tensor:
    """a·x + b·y; with a python float b, two kernels and one allocation instead of three and three."""
    if isinstance(b, float):
        return (x * a).add_(y, alpha=b)  # in place on a fresh tensor: safe for autograd (mul saves x, a only)
    return x * a + y * b


class GaussianDiffusion:
    """The diffusion process on a (possibly respaced) chain of ``num_timesteps`` steps.

    :param betas: float64 [T] betas of this chain (see schedule.py / respace.py).
    :param mean_type: what the model predicts.
    :param var_type: fixed or learned reverse variance.
    :param loss_type: training objective.
    :param timestep_map: [T] original-chain index of each step (identity when None); fed to the model.
    :param snr_gamma: γ of min-SNR-γ loss weighting (Hang et al. 2023), or None for unweighted MSE.
    :param vlb_weight: λ of the hybrid loss (0.001 in Nichol & Dhariwal 2021).
    :param data_bin_width: quantisation step of the data for the t = 0 likelihood (2/255 for 8-bit images).
    """

    def __init__(
        self,
        *,
        betas: np.ndarray,
        mean_type: ModelMeanType,
        var_type: ModelVarType,
        loss_type: LossType,
        timestep_map: Sequence[int] | np.ndarray | None = None,
        snr_gamma: float | None = None,
        vlb_weight: float = 0.001,
        data_bin_width: float = 2.0 / 255.0,
    ) -> None:
        for value, cls in ((mean_type, ModelMeanType), (var_type, ModelVarType), (loss_type, LossType)):
            if not isinstance(value, cls):
                raise TypeError(f"expected {cls.__name__}, got {value!r}; use create_diffusion() for strings")
        if (loss_type == LossType.HYBRID) != (var_type == ModelVarType.LEARNED_RANGE) and loss_type != LossType.KL:
            raise ValueError(
                f"loss_type {loss_type.value!r} with var_type {var_type.value!r}: a learned variance needs "
                "loss_type 'hybrid' (or 'kl') to be trained, and 'hybrid' needs var_type 'learned_range'"
            )
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.snr_gamma, self.vlb_weight, self.data_bin_width = snr_gamma, vlb_weight, data_bin_width
        self.betas = betas
        self.num_timesteps = T = len(betas)
        self.timestep_map = np.arange(T, dtype=np.int64) if timestep_map is None else np.asarray(timestep_map, np.int64)
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},), got {self.timestep_map.shape}")

        alphas = 1.0 - betas
        self.alphas_cumprod = ac = np.cumprod(alphas)
        self.alphas_cumprod_prev = acp = np.append(1.0, ac[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        self.snr = ac / (1.0 - ac)
        # Posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020 eqs. 6-7).
        self.posterior_variance = pv = betas * (1.0 - acp) / (1.0 - ac)
        # β̃_0 = 0, so its log is clipped to β̃_1 (improved-diffusion); a 1-step chain falls back to β.
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]) if T > 1 else betas)
        self.posterior_mean_coef1 = betas * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac)
        self.fixed_large_variance = np.append(pv[1], betas[1:]) if T > 1 else betas
        self.log_betas = np.log(betas)
        self._device_tables: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}

    # ----------------------------------------------------------------------------------------------- helpers

    _TABLES = (
        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "snr", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef1", "posterior_mean_coef2", "fixed_large_variance", "log_betas",
    )  # fmt: skip

    def _tables(self, device: torch.device, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
        # The float64 schedule cast once per (device, dtype), so extraction is a bare index.
        key = (device, dtype)
        if key not in self._device_tables:
            tables = {k: torch.as_tensor(getattr(self, k)).to(device=device, dtype=dtype) for k in self._TABLES}
            tables["timestep_map"] = torch.as_tensor(self.timestep_map, device=device)
            self._device_tables[key] = tables
        return self._device_tables[key]

    def _extract(self, name: str, t: Steps, x: Tensor) -> Tensor | float:
        """Schedule array ``name`` at steps t [N] in x.dtype, shaped [N, 1, ...] to broadcast over x; a python
        float (computed in float64) when t is an int."""
        if not isinstance(t, Tensor):
            return float(getattr(self, name)[int(t)])
        return self._tables(x.device, x.dtype)[name][t].view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: Steps, x: Tensor) -> Tensor:
        """The original chain's indices [N] (int64) that the model sees for this chain's steps t and batch x."""
        if not isinstance(t, Tensor):
            return torch.full((x.shape[0],), int(self.timestep_map[int(t)]), dtype=torch.long, device=x.device)
        return self._tables(t.device)["timestep_map"][t]

    def respace(self, section_counts: StepSpec) -> GaussianDiffusion:
        """The same process on a subset of this chain's steps (see :func:`respace.space_timesteps`)."""
        use = space_timesteps(self.num_timesteps, section_counts)
        betas, kept = respace_betas(self.alphas_cumprod, use)
        return GaussianDiffusion(
            betas=betas, mean_type=self.mean_type, var_type=self.var_type, loss_type=self.loss_type,
            timestep_map=self.timestep_map[kept], snr_gamma=self.snr_gamma, vlb_weight=self.vlb_weight,
            data_bin_width=self.data_bin_width,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I) (Ho et al. 2020 eq. 4): (mean, variance, log-variance) [N x ...]."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        var = self._tables(x_start.device, x_start.dtype)["sqrt_one_minus_alphas_cumprod"][t] ** 2
        var = var.view(-1, *([1] * (x_start.ndim - 1))).expand_as(x_start)
        return mean, var, torch.log(var)

    def q_sample(
        self, x_start: Tensor, t: Steps, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (Ho et al. 2020 eq. 4).

        :param x_start: [N x ...] clean data.
        :param t: [N] int64 steps of this chain (or one int for all).
        :param noise: [N x ...] ε; drawn from ``generator`` when None.
        :return: [N x ...] noised data.
        """
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean(self, x_start: Tensor, x_t: Tensor, t: Steps) -> Tensor:
        """Mean [N x ...] of q(x_{t-1} | x_t, x_0) (Ho et al. 2020 eq. 7)."""
        c1, c2 = self._extract("posterior_mean_coef1", t, x_t), self._extract("posterior_mean_coef2", t, x_t)
        return _lin(c1, x_start, c2, x_t)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x_0) (Ho et al. 2020 eqs. 6-7): (mean, variance β̃_t, log β̃_t clipped), each [N x ...]."""
        tables = self._tables(x_t.device, x_t.dtype)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        var = tables["posterior_variance"][t].view(shape).expand_as(x_t)
        log_var = tables["posterior_log_variance_clipped"][t].view(shape).expand_as(x_t)
        return self.q_posterior_mean(x_start, x_t, t), var, log_var

    # ------------------------------------------------------------------------------ parameterisations

    def predict_x0_from_eps(self, x_t: Tensor, t: Steps, eps: Tensor) -> Tensor:
        """x₀ = (x_t − √(1−ᾱ) ε)/√ᾱ; all tensors [N x ...]."""
        c1 = self._extract("sqrt_recip_alphas_cumprod", t, x_t)
        c2 = self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)
        return _lin(c1, x_t, -c2, eps)

    def predict_eps_from_x0(self, x_t: Tensor, t: Steps, x0: Tensor) -> Tensor:
        """ε = (x_t − √ᾱ x₀)/√(1−ᾱ); all tensors [N x ...]."""
        c1 = self._extract("sqrt_recip_alphas_cumprod", t, x_t)
        c2 = self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)
        return _lin(c1 / c2, x_t, -1 / c2, x0)

    def predict_x0_from_v(self, x_t: Tensor, t: Steps, v: Tensor) -> Tensor:
        """x₀ = √ᾱ x_t − √(1−ᾱ) v (Salimans & Ho 2022 §4); all tensors [N x ...]."""
        a, s = self._extract("sqrt_alphas_cumprod", t, x_t), self._extract("sqrt_one_minus_alphas_cumprod", t, x_t)
        return _lin(a, x_t, -s, v)

    def predict_eps_from_v(self, x_t: Tensor, t: Steps, v: Tensor) -> Tensor:
        """ε = √(1−ᾱ) x_t + √ᾱ v; all tensors [N x ...]."""
        a, s = self._extract("sqrt_alphas_cumprod", t, x_t), self._extract("sqrt_one_minus_alphas_cumprod", t, x_t)
        return _lin(s, x_t, a, v)

    def get_v(self, x0: Tensor, eps: Tensor, t: Steps) -> Tensor:
        """v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022 §4); all tensors [N x ...]."""
        a, s = self._extract("sqrt_alphas_cumprod", t, x0), self._extract("sqrt_one_minus_alphas_cumprod", t, x0)
        return _lin(a, eps, -s, x0)

    def offset_model(self, model: Model, offset: Tensor) -> Model:
        """``model``, trained on x₀ − ``offset`` (e.g. an upsampler's residual over its upsampled input, SRDiff),
        as a model of x₀ itself, so samplers walk the data: clipping x̂₀ to [-1, 1] bounds the data (a static clip
        of the residual would be wrong) and known-region replacement takes data.

        In the residual's frame x_t = x_t(x₀) − √ᾱ_t·offset; ε is shared, the x₀ prediction gains the offset and
        v = √ᾱ ε − √(1−ᾱ) x₀ loses √(1−ᾱ)·offset; variance channels pass. Build it on the training chain: samplers
        call the model with the original chain's timesteps, which must index this chain's schedule.

        :param offset: [N x ...] added to the model's data (shaped like x_t).
        """
        if not np.array_equal(self.timestep_map, np.arange(self.num_timesteps)):
            raise ValueError("offset_model needs the training chain (samplers pass its timesteps), not a respaced one")
        mean_type = self.mean_type

        def shifted(x_t: Tensor, timesteps: Tensor, **extra_args: Any) -> Tensor:
            tables = self._tables(x_t.device, x_t.dtype)
            shape = (-1, *([1] * (x_t.ndim - 1)))
            a = tables["sqrt_alphas_cumprod"][timesteps].view(shape)
            pred, var_output = self.split_output(model(x_t - a * offset, timesteps, **extra_args))
            if mean_type == ModelMeanType.START_X:
                pred = pred + offset
            elif mean_type == ModelMeanType.VELOCITY:
                pred = pred - tables["sqrt_one_minus_alphas_cumprod"][timesteps].view(shape) * offset
            return pred if var_output is None else torch.cat([pred, var_output], dim=1)

        return shifted

    def split_output(self, output: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split a raw model output into (prediction [N x C x ...], variance logits [N x C x ...] or None)."""
        if self.var_type == ModelVarType.LEARNED_RANGE:
            return torch.chunk(output, 2, dim=1)  # type: ignore[return-value]
        return output, None

    def predictions_from_output(
        self,
        output: Tensor,
        x_t: Tensor,
        t: Steps,
        *,
        clip_denoised: bool = False,
        dynamic_threshold: float | None = None,
    ) -> dict[str, Tensor | None]:
        """Turn a raw model output into x₀ and ε predictions.

        :param output: raw model output (see module docstring).
        :param x_t: [N x ...] model input.
        :param t: [N] steps of this chain, or one int for all.
        :param clip_denoised: clip x₀ to [-1, 1] (images; not the prior's embeddings).
        :param dynamic_threshold: Imagen percentile p (overrides clip_denoised).
        :return: dict with "pred_x0", "pred_eps" (consistent with x_t after any clipping), "var_output" or None.
        """
        pred, var_output = self.split_output(output)
        if self.mean_type == ModelMeanType.EPSILON:
            eps: Tensor | None = pred
            x0 = self.predict_x0_from_eps(x_t, t, pred)
        elif self.mean_type == ModelMeanType.START_X:
            eps, x0 = None, pred
        else:
            eps, x0 = self.predict_eps_from_v(x_t, t, pred), self.predict_x0_from_v(x_t, t, pred)
        if clip_denoised or dynamic_threshold is not None:
            x0 = threshold_x0(x0, clip_denoised, dynamic_threshold)
            eps = None  # recompute so that x_t = √ᾱ x₀ + √(1−ᾱ) ε still holds (improved-diffusion's DDIM)
        if eps is None:
            eps = self.predict_eps_from_x0(x_t, t, x0)
        return {"pred_x0": x0, "pred_eps": eps, "var_output": var_output}

    def model_predictions(
        self,
        model: Model,
        x_t: Tensor,
        t: Steps,
        extra_args: Mapping[str, Any] | None = None,
        *,
        clip_denoised: bool = False,
        dynamic_threshold: float | None = None,
    ) -> dict[str, Tensor | None]:
        """Call ``model(x_t, timestep_map[t], **extra_args)`` and return :meth:`predictions_from_output`."""
        # Under autocast the network returns bf16/fp16; an x₀ prediction would otherwise carry that dtype into
        # the sampler state (x_{t-1} is built from x̂₀), so the output takes the state's dtype here.
        output = model(x_t, self.model_timesteps(t, x_t), **(extra_args or {})).to(x_t.dtype)
        return self.predictions_from_output(
            output, x_t, t, clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold
        )

    def p_log_variance(self, t: Steps, x_t: Tensor, var_output: Tensor | None) -> Tensor | float:
        """Log-variance of p(x_{t-1} | x_t) for the process's ModelVarType, broadcastable to x_t.

        :param t: [N] steps of this chain, or one int for all.
        :param x_t: [N x ...] current sample (for shape, dtype and device).
        :param var_output: [N x ...] the model's variance channels v ∈ [-1, 1] (LEARNED_RANGE only).
        :return: a fresh tensor [N x ...] (learned), [N x 1 ...] (fixed, tensor t) or a python float (fixed, int t).
        """
        if self.var_type == ModelVarType.LEARNED_RANGE:
            assert var_output is not None
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            # Nichol & Dhariwal eq. 15 with v' = (v+1)/2: v' log β + (1−v') log β̃ = mid + v·half
            return (var_output * ((max_log - min_log) / 2)).add_((max_log + min_log) / 2)
        if self.var_type == ModelVarType.FIXED_SMALL:
            return self._extract("posterior_log_variance_clipped", t, x_t)
        var = self._extract("fixed_large_variance", t, x_t)
        return math.log(var) if isinstance(var, float) else torch.log(var)

    def p_variance(self, t: Steps, x_t: Tensor, var_output: Tensor | None) -> tuple[Tensor | float, Tensor | float]:
        """Reverse-step (variance, log-variance) for the process's ModelVarType.

        :return: tensors [N x ...]; for an int t with a fixed variance, python floats (broadcast them yourself).
        """
        log_var = self.p_log_variance(t, x_t, var_output)
        if self.var_type == ModelVarType.FIXED_SMALL:  # exact zero at t = 0 (only the log is clipped)
            var = self._extract("posterior_variance", t, x_t)
        else:
            var = math.exp(log_var) if isinstance(log_var, float) else torch.exp(log_var)
        if isinstance(var, float) or isinstance(log_var, float):
            return var, log_var
        return var.expand_as(x_t), log_var.expand_as(x_t)

    def p_mean_variance(
        self,
        model: Model,
        x_t: Tensor,
        t: Steps,
        extra_args: Mapping[str, Any] | None = None,
        *,
        clip_denoised: bool = False,
        dynamic_threshold: float | None = None,
    ) -> dict[str, Any]:
        """p(x_{t-1} | x_t): run the model and return its mean, variance and x₀ prediction.

        :param model: called as ``model(x_t, timestep_map[t], **extra_args)``.
        :param x_t: [N x ...] current sample.
        :param t: [N] int64 steps of this chain, or one int for the whole batch.
        :param extra_args: conditioning kwargs for the model.
        :return: dict of [N x ...] tensors "mean", "variance", "log_variance", "pred_x0", "pred_eps" (variances
            are python floats for an int t with a fixed variance type).
        """
        preds = self.model_predictions(
            model, x_t, t, extra_args, clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold
        )
        return self._p_from_predictions(preds, x_t, t)

    def _p_from_predictions(self, preds: dict[str, Tensor | None], x_t: Tensor, t: Steps) -> dict[str, Any]:
        x0, eps = preds["pred_x0"], preds["pred_eps"]
        assert x0 is not None and eps is not None
        mean = self.q_posterior_mean(x0, x_t, t)
        var, log_var = self.p_variance(t, x_t, preds["var_output"])
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_x0": x0, "pred_eps": eps}

    # ------------------------------------------------------------------------------------------ losses

    def loss_weight(self, t: Tensor, like: Tensor) -> Tensor:
        """Per-example MSE weight [N] at steps t [N]: 1, or min-SNR-γ for this parameterisation (losses.py)."""
        if self.snr_gamma is None:
            return torch.ones(t.shape, dtype=like.dtype, device=like.device)
        return min_snr_weight(self._tables(like.device, like.dtype)["snr"][t], self.snr_gamma, self.mean_type)

    def vb_terms_bpd(self, output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """One VLB term L_t in bits per dimension [N], in at least float32 (Nichol & Dhariwal 2021 eq. 4-5).

        L_t = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, and −log p(x_0|x_1) under the discretised
        Gaussian (bins of ``data_bin_width``) at t = 0.

        :param output: raw model output at (x_t, t) (detach its mean part to train only the variance).
        """
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        output, x_start, x_t = output.to(dtype), x_start.to(dtype), x_t.to(dtype)
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self._p_from_predictions(self.predictions_from_output(output, x_t, t), x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(
                x_start, means=p["mean"], log_scales=0.5 * p["log_variance"], bin_width=self.data_bin_width
            )
        ) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: Model,
        x_start: Tensor,
        t: Tensor,
        extra_args: Mapping[str, Any] | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-example training terms for one step each.

        :param model: called as ``model(x_t, timestep_map[t], **extra_args)``.
        :param x_start: [N x ...] clean data.
        :param t: [N] int64 steps of this chain (uniform draws in training).
        :param extra_args: conditioning kwargs for the model.
        :param noise: [N x ...] ε, drawn from ``generator`` when None.
        :return: dict of [N] tensors: "loss" (to average and backprop), "mse" (unweighted) unless loss_type is
            KL, and "vlb" (L_t in bits/dim) for HYBRID and KL. HYBRID: loss = w·mse + vlb_weight·T·vlb, with the
            mean part of the output detached inside vlb so it only trains the variance (Nichol & Dhariwal §3.1).
        """
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.model_timesteps(t, x_t), **(extra_args or {}))
        if self.loss_type == LossType.KL:
            vlb = self.vb_terms_bpd(output, x_start, x_t, t)
            return {"loss": vlb, "vlb": vlb}
        pred, var_output = self.split_output(output)
        target = {
            ModelMeanType.EPSILON: noise,
            ModelMeanType.START_X: x_start,
            ModelMeanType.VELOCITY: self.get_v(x_start, noise, t),
        }[self.mean_type]
        dtype = torch.promote_types(pred.dtype, torch.float32)
        mse = mean_flat((target.to(dtype) - pred.to(dtype)) ** 2)
        terms = {"mse": mse, "loss": self.loss_weight(t, mse) * mse}
        if self.loss_type == LossType.HYBRID:
            assert var_output is not None
            frozen = torch.cat([pred.detach(), var_output], dim=1)
            terms["vlb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            # λ·L_vlb with L_vlb ≈ T·L_t (improved-diffusion's RESCALED_MSE: vb · T/1000 for λ = 0.001).
            terms["loss"] = terms["loss"] + self.vlb_weight * self.num_timesteps * terms["vlb"]
        return terms
