"""``unclip-demo``: the main job on the built-in default data, on a CPU.

Generates the demo shapes set (no download), checks it through the training pipeline, then trains
every stage that exists with its tiny ``demo_*`` preset, chaining checkpoints, and prints a JSON
summary (also written to ``<out>/summary.json``). A stage finished by an earlier run (checkpoint and
metrics.json present) is reused; ``--fresh`` retrains. Stages still to be built are listed as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from unclip.config import register_resolvers

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# (stage, experiment preset, the checkpoint key later stages receive its result under)
STAGES = [("clip", "demo_clip_tiny", "clip_ckpt"),
          ("prior", "demo_prior_tiny", "prior_ckpt"),
          ("decoder", "demo_decoder_tiny", "decoder_ckpt"),
          ("upsampler", "demo_upsampler_tiny", "upsampler_ckpts")]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _finished(run_dir: Path) -> dict | None:
    """A stage run that completed before (its final checkpoint and metrics exist), for reuse."""
    last, metrics = run_dir / "checkpoints" / "last.ckpt", run_dir / "metrics.json"
    if not (last.is_file() and metrics.is_file()):
        return None
    return {"run_dir": str(run_dir), "last_checkpoint": str(last), "metrics": json.loads(metrics.read_text())}


def run_demo(out: Path, steps: int | None = None, extra: list[str] | None = None, fresh: bool = False) -> dict:
    """Run every available stage on the demo data, reusing stages finished by an earlier run."""
    from unclip.data.demo_shapes import DemoShapesConfig, ensure_demo_shards
    from unclip.data.inspect import check_shards
    from unclip.training.runner import train

    register_resolvers()
    start = time.perf_counter()
    shards = ensure_demo_shards(DemoShapesConfig())
    summary: dict = {"data": {"shards": shards, "val_check": check_shards([shards["val"]], image_size=64)},
                     "stages": {}}
    chain: list[str] = []
    for stage, experiment, ckpt_key in STAGES:
        if not (CONF_DIR / "experiment" / f"{experiment}.yaml").exists():
            summary["stages"][stage] = {"status": "not built yet"}
            continue
        run_dir = out / stage
        result = None if fresh else _finished(run_dir)
        if result is not None:
            summary["stages"][stage] = {"status": "reused", **result}
        else:
            overrides = [f"stage={stage}", f"experiment={experiment}", f"run_dir={run_dir}", *chain, *(extra or [])]
            if steps is not None:  # validate and checkpoint at the end of the shortened run
                overrides += [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                              f"callbacks.checkpoint.every_n_train_steps={steps}"]
            stage_start = time.perf_counter()
            result = train(compose_train(overrides))
            result["seconds"] = round(time.perf_counter() - stage_start, 1)
            if (run_dir / "metrics.json").is_file():
                result["metrics"] = json.loads((run_dir / "metrics.json").read_text())
            summary["stages"][stage] = {"status": "trained", **result}
        ckpt = result["last_checkpoint"]
        chain.append(f"{ckpt_key}=[{ckpt}]" if ckpt_key == "upsampler_ckpts" else f"{ckpt_key}={ckpt}")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unclip-demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where runs and summary.json go")
    parser.add_argument("--steps", type=int, default=None, help="training steps per stage (default: preset)")
    parser.add_argument("--fresh", action="store_true", help="retrain stages that an earlier run finished")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage, e.g. data.num_workers=0")
    args = parser.parse_args(argv)
    summary = run_demo(args.out, args.steps, args.overrides, args.fresh)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
