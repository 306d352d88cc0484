"""Training timestep samplers (improved-diffusion resample.py; Nichol & Dhariwal 2021 §3.3).

``sample`` returns timesteps and per-example importance weights; multiply each example's loss by its weight
so the expected loss is unchanged. This version is single-process: for DDP, gather (t, loss) before
``update_with_losses``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class UniformSampler:
    """t ~ U{0, ..., T-1}, weight 1.

    :param num_timesteps: chain length T.
    """

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def weights(self) -> np.ndarray:
        """Unnormalised sampling probabilities [T]."""
        return np.ones(self.num_timesteps, dtype=np.float64)

    def sample(
        self, batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """:return: (t [N] int64, weights [N] float32) with weights = 1/(T·p(t))."""
        p = torch.as_tensor(self.weights() / self.weights().sum())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        w = (1.0 / (self.num_timesteps * p[t])).float()
        return t.to(device), w.to(device)


class LossSecondMomentResampler(UniformSampler):
    """Importance sampling with p(t) ∝ √E[L_t²] once every step has ``history`` losses (Nichol & Dhariwal eq. 18).

    :param num_timesteps: chain length T.
    :param history: losses remembered per step.
    :param uniform_prob: mixture weight of the uniform distribution, keeping every step visited.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        self.history, self.uniform_prob = history, uniform_prob
        self._losses = np.zeros((num_timesteps, history), dtype=np.float64)
        self._counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        """Whether every step has ``history`` recorded losses (until then sampling is uniform)."""
        return bool((self._counts == self.history).all())

    def weights(self) -> np.ndarray:
        """Unnormalised p(t) [T]: √E[L_t²] mixed with ``uniform_prob`` of uniform, or uniform while warming up."""
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self._losses**2, axis=-1))
        w /= w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_losses(self, ts: Tensor, losses: Tensor) -> None:
        """Record per-example losses [N] (e.g. the "vlb" term) at their timesteps [N]."""
        for t, loss in zip(ts.tolist(), losses.detach().float().tolist()):
            if self._counts[t] == self.history:
                self._losses[t, :-1] = self._losses[t, 1:]
                self._losses[t, -1] = loss
            else:
                self._losses[t, self._counts[t]] = loss
                self._counts[t] += 1


def create_named_schedule_sampler(name: str, num_timesteps: int) -> UniformSampler:
    """"uniform" or "loss-second-moment"; unknown names raise listing the valid ones."""
    samplers = {"uniform": UniformSampler, "loss-second-moment": LossSecondMomentResampler}
    if name not in samplers:
        raise ValueError(f"unknown schedule sampler {name!r}; valid: {sorted(samplers)}")
    return samplers[name](num_timesteps)
