"""The runner's overhead per training step: ``runner_overhead``.

    python scripts/bench.py --only runner_overhead --out runner.json     # on a quiet machine

For each tiny preset of the prior, decoder and upsampler (demo presets always; emoji presets when the emoji
shards are found through ``UNCLIP_EMOJI_ROOT``, and not with ``--quick``) it times, in a fresh process each:

* ``runner_step_s``: the median wall time between consecutive training batches through the real runner
  (``unclip.training.runner.train``: the preset's loader and workers, on-the-fly CLIP embedding, logging, EMA,
  callbacks; validation off, since it is not a per-step cost), the first ``WARMUP`` steps dropped;
* ``bare_step_s``: the same module's network step alone on one batch conditioned once (forward, backward, the
  preset's optimizer step), at the thread count and allocator setting the runner chose;
* ``overhead_ratio`` = runner / bare (issue 19's target: at most 1.15).

The CLIP is a random-weights export of the preset's CLIP architecture (its weights do not change the cost).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import compose_train, isolated, row, step_intervals, suite_main  # noqa: E402

# preset -> the preset that trains its CLIP (whose architecture the random CLIP export copies)
PRESETS = {"demo_prior_tiny": "demo_clip_tiny", "demo_decoder_tiny": "demo_clip_tiny",
           "demo_upsampler_tiny": "demo_clip_tiny", "emoji_prior_tiny": "emoji_clip_tiny",
           "emoji_decoder_tiny": "emoji_clip_tiny", "emoji_upsampler_tiny": "emoji_clip_tiny"}
WARMUP = 2


class StepClock(pl.Callback):
    """Writes the wall clock at the end of every training batch to ``path`` (one JSON list, at the end of fit)."""

    def __init__(self, path: str):
        self.path, self.stamps = path, []  # type: ignore[var-annotated]

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.stamps.append(time.perf_counter())

    def on_fit_end(self, *args: Any) -> None:
        Path(self.path).write_text(json.dumps(self.stamps))


def stage_of(preset: str) -> str:
    return next(s for s in ("prior", "decoder", "upsampler") if f"_{s}_" in preset)


def overrides(preset: str, clip: Path, run_dir: Path, steps: int) -> list[str]:
    return [f"stage={stage_of(preset)}", f"experiment={preset}", f"clip_ckpt={clip}", f"run_dir={run_dir}",
            f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0"]


def export_clip(clip_preset: str, directory: Path) -> Path:
    from omegaconf import OmegaConf

    from unclip.models.clip import build_clip, clip_metadata, export_open_clip

    model_cfg = OmegaConf.to_container(compose_train([f"experiment={clip_preset}"]).model, resolve=True)
    torch.manual_seed(0)
    clip, oc_cfg = build_clip(model_cfg)
    return export_open_clip(clip, clip_metadata(clip, model_cfg, oc_cfg), directory)


def runner_steps(preset: str, clip: str, run_dir: str, steps: int) -> list[float]:
    """Per-step seconds of ``preset`` through ``train``, clocked by :class:`StepClock`."""
    from unclip.training.runner import train

    stamps = Path(run_dir) / "stamps.json"
    cfg = compose_train(overrides(preset, Path(clip), Path(run_dir), steps)
                        + ["+callbacks.step_clock._target_=bench_runner.StepClock",
                           f"+callbacks.step_clock.path={stamps}"])
    cfg.data.num_workers = compose_train([f"experiment={preset}"]).data.num_workers  # the preset's own loader
    train(cfg)
    return step_intervals(json.loads(stamps.read_text()), WARMUP)


def bare_steps(preset: str, clip: str, run_dir: str, repeats: int) -> dict[str, Any]:
    """Per-step seconds of the module's network step alone on one batch, conditioned once, as the runner sets up
    threads and the allocator."""
    from hydra.utils import instantiate

    from unclip.runtime import configure_cpu_runtime

    cfg = compose_train(overrides(preset, Path(clip), Path(run_dir), 1))
    runtime = configure_cpu_runtime(compose_train([f"experiment={preset}"]).data.num_workers, cfg.cpu_threads)
    pl.seed_everything(cfg.seed)
    data = instantiate(cfg.data)
    data.setup("fit")
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)  # uint8 -> [-1, 1], as in fit
    module = instantiate(cfg.module, _recursive_=False)
    module.setup("fit")
    if hasattr(module, "configure_model"):
        module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    with torch.no_grad():
        x0, kwargs = module.training_inputs(batch)  # every diffusion stage: the same inputs its training_step uses
        net, process = module.net, module.process
    net.train()

    def step() -> float:
        start = time.perf_counter()
        t = torch.randint(0, process.num_timesteps, (x0.shape[0],))
        process.training_losses(net, x0, t, kwargs)["loss"].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = [step() for _ in range(WARMUP + repeats)][WARMUP:]
    return {"times": times, "runtime": runtime, "batch": int(x0.shape[0])}


def emoji_available() -> bool:
    root = Path(os.environ.get("UNCLIP_EMOJI_ROOT", ROOT.parent / "shared" / "data" / "emoji"))
    return (root / "train").is_dir()


def run(quick: bool = False) -> list[dict]:
    steps = WARMUP + (3 if quick else 20)
    # quick: the demo presets only (one per stage), to prove the suite runs
    presets = [p for p in PRESETS if p.startswith("demo_") or (emoji_available() and not quick)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clips: dict[str, Path] = {}
        for preset in presets:
            clip_preset = PRESETS[preset]
            if clip_preset not in clips:
                clips[clip_preset] = isolated(export_clip, clip_preset, Path(tmp) / clip_preset)
            run_dir = Path(tmp) / preset
            runner = isolated(runner_steps, preset, str(clips[clip_preset]), str(run_dir), steps)
            bare = isolated(bare_steps, preset, str(clips[clip_preset]), str(Path(tmp) / f"{preset}_bare"),
                            steps - WARMUP)
            r, b = statistics.median(runner), statistics.median(bare["times"])
            w = f"runner_overhead/{preset}/b{bare['batch']}"
            rows += [row(w, "runner_step_s", round(r, 4), "s"), row(w, "bare_step_s", round(b, 4), "s"),
                     row(w, "overhead_ratio", round(r / b, 3), "x (target <= 1.15)"),
                     row(w, "torch_threads", bare["runtime"]["torch_threads"], "threads")]
    return rows


if __name__ == "__main__":
    sys.exit(suite_main(run, __doc__))
