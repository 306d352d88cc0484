"""Demo stages end to end: training steps/s of each ``demo_*`` preset through ``unclip-train``'s own runner.

Unlike the per-stage suites (synthetic batches, network + optimiser only), this runs the real thing: the built-in
demo shards on disk, the ShardDataModule and its loader, on-the-fly CLIP embedding, logging, the runner's CPU
thread sizing (``unclip.runtime``: intra-op threads = cores - loader workers). Each stage trains ``steps`` steps at
``data.num_workers`` 0 and 1, each run in a spawned process of its own; a callback timestamps every step and the
rate is taken after the first ``skip`` steps (start-up and the loader's first batches excluded).

* ``demo_train/<stage>/w<k>``: ``steps_per_s`` and, for w0, ``ratio_to_w1`` (what the demo presets' choice of 0
  workers buys: on 2 cores one worker takes a core from the intra-op threads for loading that is idle most of the
  step).

The prior and decoder embed with a random-weight CLIP of the demo preset's shape and the upsampler checks its input
size against a random-weight demo decoder (scripts/bench_pipeline.demo_chain): speed does not depend on the weights.

    python scripts/bench_demo.py [--quick]      # prints a JSON list of {"workload", "metric", "value", "unit"}
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import compose_train, isolated, suite_main  # noqa: E402
from bench_pipeline import demo_chain  # noqa: E402

STAGES = ("clip", "prior", "decoder", "upsampler")


class StepTimes(pl.Callback):
    """Wall-clock time at the end of every training step, written to ``path`` (JSON) when training ends."""

    def __init__(self, path: str) -> None:
        self.path, self.times = path, []

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.times.append(time.perf_counter())

    def on_train_end(self, *args, **kwargs) -> None:
        Path(self.path).write_text(json.dumps(self.times))


def train_rate(stage: str, workers: int, steps: int, skip: int, chain: list[str], run_dir: str) -> float:
    """Steps/s of ``experiment=demo_<stage>_tiny`` trained ``steps`` steps with ``workers`` loader workers."""
    from omegaconf import open_dict

    from unclip.training.runner import train

    cfg = compose_train([f"stage={stage}", f"experiment=demo_{stage}_tiny", "logger=none", *chain,
                         f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
                         "trainer.enable_progress_bar=false", f"callbacks.checkpoint.every_n_train_steps={steps}"])
    times_file = Path(run_dir) / "step_times.json"
    with open_dict(cfg):
        cfg.run_dir, cfg.data.num_workers = run_dir, workers
        cfg.callbacks.step_times = {"_target_": f"{__name__}.StepTimes", "path": str(times_file)}
    train(cfg)
    times = json.loads(times_file.read_text())
    return (len(times) - 1 - skip) / (times[-1] - times[skip])


def run(quick: bool) -> list[dict]:
    """Every demo stage at 0 and 1 loader workers (``quick``: fewer steps)."""
    steps, skip = (25, 5) if quick else (80, 10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = demo_chain(Path(tmp))
        chain = {"clip": [], "prior": [f"clip_ckpt={paths['clip']}"], "decoder": [f"clip_ckpt={paths['clip']}"],
                 "upsampler": [f"decoder_ckpt={paths['decoder']}"]}
        for stage in STAGES:
            rates = {w: isolated(train_rate, stage, w, steps, skip, chain[stage], f"{tmp}/{stage}_w{w}")
                     for w in (0, 1)}
            for w, rate in rates.items():
                rows.append({"workload": f"demo_train/{stage}/w{w}", "metric": "steps_per_s", "value": rate,
                             "unit": "steps/s"})
            rows.append({"workload": f"demo_train/{stage}/w0", "metric": "ratio_to_w1", "value": rates[0] / rates[1],
                         "unit": "x"})
    return rows


def main(argv: list[str] | None = None) -> int:
    return suite_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
