"""Sampler overhead benchmark: how much time the samplers spend outside the network.

Each sampler runs with a small stand-in network on a decoder-shaped batch [B, 3, 64, 64] (a 2-layer conv, eps
prediction with learned-range variance, as the 64px decoder) and a prior-shaped batch [B, 768] (a 2-layer MLP,
x0 prediction). The network is timed call by call; overhead = (sampler wall time − network time) / network time.

    python scripts/bench_diffusion.py [--quick]      # prints a JSON list of {"workload", "metric", "value", "unit"}

``run(quick)`` is imported by the top-level scripts/bench.py.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unclip.diffusion import (
    classifier_free_guidance,
    create_diffusion,
    ddim_invert,
    karras_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_heun,
)


class TimedModel:
    """Wraps a network as ``model(x, t, **kw)`` and accumulates the wall time spent inside it."""

    def __init__(self, net: nn.Module, cuda: bool) -> None:
        self.net, self.cuda, self.seconds, self.calls = net, cuda, 0.0, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.net(x)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def _nets(device: torch.device) -> dict[str, tuple[nn.Module, tuple[int, ...], dict[str, Any]]]:
    image = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 6, 3, padding=1))
    vector = nn.Sequential(nn.Linear(768, 2048), nn.SiLU(), nn.Linear(2048, 768))
    return {
        "image64": (image.to(device).eval(), (3, 64, 64), dict(mean_type="eps", var_type="learned_range",
                                                               loss_type="hybrid")),
        "vector768": (vector.to(device).eval(), (768,), dict(mean_type="x0")),
    }  # fmt: skip


def _time(fn: Callable[[], torch.Tensor], model: TimedModel, cuda: bool, repeats: int) -> tuple[float, float, int]:
    """Median over ``repeats`` runs of (wall seconds, network seconds) per sampler call, and network calls."""
    fn()  # warm-up (allocator, kernels)
    runs = []
    for _ in range(repeats):
        model.seconds, model.calls = 0.0, 0
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        runs.append((time.perf_counter() - start, model.seconds))
    runs.sort(key=lambda r: (r[0] - r[1]) / r[1])  # the shared CPU is noisy: report the median run
    wall, net = runs[len(runs) // 2]
    return wall, net, model.calls


def _null_like(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A network that costs nothing: returns a cached output of the right shape (bookkeeping-only timing)."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def null(x: torch.Tensor) -> torch.Tensor:
        if x.shape not in cache:
            cache[x.shape] = net(x)
        return cache[x.shape]

    return null


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure every sampler's overhead; returns one dict per (workload, metric)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    steps, batch, repeats = (10, 4, 3) if quick else (50, 16, 5)
    results: list[dict[str, Any]] = []
    for shape_name, (net, shape, kw) in _nets(device).items():
        train = create_diffusion(**kw)
        chain = train.respace(steps)
        karras = train.respace(karras_timesteps(train.alphas_cumprod, steps))
        model = TimedModel(net, cuda)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn((batch, *shape), generator=g, device=device)
        cond = {"y": torch.ones(batch, dtype=torch.bool, device=device)}
        learned = kw.get("var_type") == "learned_range"
        guided = classifier_free_guidance(model, 3.0, drop_key="y", learned_variance=learned)
        cases: dict[str, Callable[[], torch.Tensor]] = {
            "ddpm": lambda: sample_ddpm(model, x, chain, generator=g),
            "ddim": lambda: sample_ddim(model, x, chain),
            "ddim_eta1": lambda: sample_ddim(model, x, chain, eta=1.0, generator=g),
            "dpmpp_2m": lambda: sample_dpmpp_2m(model, x, chain),
            "heun_karras": lambda: sample_heun(model, x, karras),
            "ddim_invert": lambda: ddim_invert(model, x, chain),
            "ddim_cfg": lambda: sample_ddim(guided, x, chain, cond),
        }
        with torch.no_grad():
            for name, fn in cases.items():
                wall, net_s, calls = _time(fn, model, cuda, repeats)
                workload = f"{name}/{shape_name}/b{batch}/{steps}steps/{device.type}"
                results += [
                    {"workload": workload, "metric": "overhead_fraction", "value": (wall - net_s) / net_s,
                     "unit": "fraction of network time"},
                    {"workload": workload, "metric": "wall_per_call", "value": wall, "unit": "s"},
                    {"workload": workload, "metric": "network_calls", "value": calls, "unit": "calls"},
                ]  # fmt: skip
            # The samplers' own bookkeeping, without the cache and thread effects a real network leaves behind.
            model.net = _null_like(net)  # type: ignore[assignment]
            for name, fn in cases.items():
                wall, _, calls = _time(fn, model, cuda, repeats)
                workload = f"{name}/{shape_name}/b{batch}/{steps}steps/{device.type}"
                results.append({"workload": workload, "metric": "null_network_time_per_call",
                                "value": wall / max(calls, 1), "unit": "s"})  # fmt: skip
            model.net = net
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, small batch")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=1))


if __name__ == "__main__":
    main()
