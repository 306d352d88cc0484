"""``unclip-demo``: the main job on the built-in default data, on a CPU.

Generates the demo shapes set (no download), checks it through the training pipeline, trains every stage with
its tiny ``demo_*`` preset, chaining checkpoints, then evaluates the chain on the val captions (``unclip-eval``:
FD-CLIP, KID, precision/recall, CLIP score, caption accuracy on seen and held-out colour×shape pairs; FID too when
Inception weights are available through ``UNCLIP_INCEPTION_WEIGHTS``) and writes ``<out>/report.md`` with the
numbers and a sample grid, plus a JSON summary (``<out>/summary.json``). A stage finished by an earlier run
(checkpoint and metrics.json present) is reused, and so is the evaluation when no stage retrained; ``--fresh``
redoes everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from unclip.config import conf_dir, register_resolvers
from unclip.demo_report import write_report

CONF_DIR = Path(conf_dir())
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


def compose_eval(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def run_eval(out: Path, chain: dict[str, str], val_shards: str, samples: int, reuse: bool) -> dict:
    """Evaluate the trained chain on the first ``samples`` val captions (reusing an earlier report when allowed)."""
    from unclip.evaluation.run import evaluate

    path = out / "eval" / "report.json"
    if reuse and path.is_file() and json.loads(path.read_text()).get("num_samples") == samples:
        return {"status": "reused", **json.loads(path.read_text())}
    cfg = compose_eval([f"{key}={value}" for key, value in chain.items()] + [
        f"val_shards='{val_shards}'", f"num_samples={samples}", f"out_dir={out / 'eval'}", "batch_size=64",
        "device=cpu", "ablation.caption_embedding=true"])  # what each stage adds: 2x the decoder's sampling
    report = evaluate(cfg)
    assert report is not None, "a single-process evaluation is rank 0, which returns the report"
    return {"status": "evaluated", **report}


def run_demo(out: Path, steps: int | None = None, extra: list[str] | None = None, fresh: bool = False,
             eval_samples: int = 128) -> dict:
    """Train every stage on the demo data (reusing stages finished by an earlier run), evaluate, write report.md."""
    from unclip.data.demo_shapes import DemoShapesConfig, ensure_demo_shards
    from unclip.data.inspect import check_shards
    from unclip.training.runner import train

    register_resolvers()
    start = time.perf_counter()
    shards = ensure_demo_shards(DemoShapesConfig())
    summary: dict = {"data": {"shards": shards, "val_check": check_shards([shards["val"]], image_size=64)},
                     "stages": {}}
    chain: list[str] = []
    checkpoints: dict[str, str] = {}
    retrained = False
    for stage, experiment, ckpt_key in STAGES:
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
            retrained = True
        ckpt = result["last_checkpoint"]
        checkpoints[ckpt_key] = f"[{ckpt}]" if ckpt_key == "upsampler_ckpts" else ckpt
        chain.append(f"{ckpt_key}={checkpoints[ckpt_key]}")
    if eval_samples > 0:
        eval_start = time.perf_counter()
        report = run_eval(out, checkpoints, shards["val"], eval_samples, reuse=not (fresh or retrained))
        summary["eval"] = {k: report.get(k) for k in ("status", "num_samples", "fid", "fd_clip", "kid_mean",
                                                      "precision", "recall", "clip_score", "caption_accuracy",
                                                      "ablation")}
        summary["eval"]["seconds"] = round(time.perf_counter() - eval_start, 1)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out, summary, report if eval_samples > 0 else None)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unclip-demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where runs and summary.json go")
    parser.add_argument("--steps", type=int, default=None, help="training steps per stage (default: preset)")
    parser.add_argument("--fresh", action="store_true", help="retrain stages that an earlier run finished")
    parser.add_argument("--eval-samples", type=int, default=128,
                        help="val captions sampled for the evaluation (0: skip it)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage, e.g. data.num_workers=0")
    args = parser.parse_args(argv)
    summary = run_demo(args.out, args.steps, args.overrides, args.fresh, args.eval_samples)
    print(json.dumps(summary, indent=2))
    print(f"report: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
