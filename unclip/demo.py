"""``unclip-demo``: the main job on the built-in default data, on a CPU.

Generates the demo shapes set (no download), checks it through the training pipeline, trains every stage with
its tiny ``demo_*`` preset, chaining checkpoints, then evaluates the chain on the val captions (``unclip-eval``:
FD-CLIP, KID, precision/recall, CLIP score, caption accuracy on seen and held-out colour×shape pairs; FID too when
Inception weights are available through ``UNCLIP_INCEPTION_WEIGHTS``) and writes ``<out>/report.md`` with the
numbers and a sample grid, plus a JSON summary (``<out>/summary.json``). A stage finished by an earlier run
(checkpoint and metrics.json present) is reused, and so is the evaluation when no stage retrained; ``--fresh``
redoes everything.

The whole demo runs within ``--budget-minutes`` of wall-clock time (conf/demo.yaml): each stage gets a share of it
and trains the steps that fit, calibrated from its first timed steps (unclip.demo_budget); ``--steps`` trains a
fixed count instead. Progress lines on stderr say which stage runs and how much of the budget is left.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir

from unclip.config import conf_dir, register_resolvers
from unclip.demo_budget import (
    BudgetSettings,
    Timing,
    allotment,
    clock,
    clock_overrides,
    plan_steps,
    progress_line,
    read_timing,
    say,
)
from unclip.demo_report import write_report

log = logging.getLogger(__name__)
CONF_DIR = Path(conf_dir())
# (stage, experiment preset, the checkpoint key later stages receive its result under)
STAGES = [("clip", "demo_clip_tiny", "clip_ckpt"),
          ("prior", "demo_prior_tiny", "prior_ckpt"),
          ("decoder", "demo_decoder_tiny", "decoder_ckpt"),
          ("upsampler", "demo_upsampler_tiny", "upsampler_ckpts")]
TIMING_FILE = "timing.json"  # a stage run's BudgetClock record (unclip.demo_budget.Timing)
EVAL_AFTER_S = 5.0  # the evaluation's time after its last caption batch: scoring, report, grid
EMBED_DIR = "embeddings"  # the trained CLIP's embeddings of the demo shards (unclip-embed), under --out


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


def run_eval(out: Path, chain: dict[str, str], val_shards: str, samples: int, reuse: bool,
             max_seconds: float | None = None) -> dict:
    """Evaluate the trained chain on the first ``samples`` val captions (reusing an earlier report when allowed),
    sampling batches of 16 captions while they fit ``max_seconds`` (None: all of them)."""
    from unclip.evaluation.run import evaluate

    path = out / "eval" / "report.json"
    if reuse and path.is_file() and json.loads(path.read_text()).get("num_samples_requested") == samples:
        return {"status": "reused", **json.loads(path.read_text())}
    # FID only with local Inception weights: offline, a download attempt only costs time
    extractor = "auto" if os.environ.get("UNCLIP_INCEPTION_WEIGHTS") else "clip"
    cfg = compose_eval([f"{key}={value}" for key, value in chain.items()] + [
        f"val_shards='{val_shards}'", f"num_samples={samples}", f"out_dir={out / 'eval'}", "batch_size=16",
        f"feature_extractor={extractor}", f"max_seconds={'null' if max_seconds is None else round(max_seconds, 1)}",
        "device=cpu", "ablation.caption_embedding=true"])  # what each stage adds: 2x the decoder's sampling
    report = evaluate(cfg)
    assert report is not None, "a single-process evaluation is rank 0, which returns the report"
    return {"status": "evaluated", **report}


@dataclass
class Budget:
    """The demo's wall-clock budget: when it started, its length (None: no budget) and conf/demo.yaml."""

    start: float
    seconds: float | None
    settings: BudgetSettings

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.time() - self.start)

    def say(self, label: str, message: str) -> None:
        say(progress_line(label, message, self.start, self.seconds))


def _clean_stage(run_dir: Path) -> None:
    """A stage about to retrain: drop the metrics and timing of an earlier run (metrics.json merges, and a stage
    interrupted after its probe must not look finished)."""
    for name in ("metrics.json", TIMING_FILE):
        (run_dir / name).unlink(missing_ok=True)


def _timed_train(overrides: list[str], run_dir: Path) -> tuple[dict, Timing]:
    from unclip.training.runner import train

    call = time.time()
    result = train(compose_train(overrides))
    return result, read_timing(run_dir / TIMING_FILE, call, time.time())


def train_stage(stage: str, overrides: list[str], run_dir: Path, budget: Budget, later: list[str],
                steps: int | None) -> dict:
    """Train one stage: ``steps`` steps, the preset's (no budget), or as many as fit its share of the budget."""
    preset_cfg = compose_train(overrides)
    preset = int(preset_cfg.trainer.max_steps)
    settings = budget.settings
    entry: dict = {"preset_steps": preset}
    _clean_stage(run_dir)
    if budget.seconds is None or steps is not None:
        planned = preset if steps is None else steps
        budget.say(stage, f"training {planned} steps (preset: {preset})")
        timer = clock_overrides(stage, budget.start, budget.seconds, None, settings.progress_every_s,
                                run_dir / TIMING_FILE)
        result, timing = _timed_train([*overrides, *_step_overrides(planned), *timer], run_dir)
        entry.update(planned_steps=planned, timing=timing.as_dict())
    else:
        allotted = allotment(budget.remaining(), settings.shares, stage, later)
        stage_end = time.time() + allotted
        entry.update(share=settings.shares[stage], allotted_s=round(allotted, 1))
        probe = min(settings.probe_steps, preset)
        if probe > int(preset_cfg.module.scheduler.warmup_steps):
            log.warning("%s: the probe's %d steps outrun the %d warm-up steps: its learning rates follow a schedule "
                        "as long as the preset's, not the planned one", stage, probe,
                        preset_cfg.module.scheduler.warmup_steps)
        budget.say(stage, f"{clock(allotted)} for this stage; timing its first {probe} steps (preset: {preset})")
        clock_args = (stage, budget.start, budget.seconds, stage_end, settings.progress_every_s, run_dir / TIMING_FILE)
        # the probe's steps are the warm-up of a schedule as long as the preset's (the warm-up is the same whatever
        # the length), so the resumed run continues them exactly
        stop_at = time.time() + settings.probe_fraction * allotted  # a slow machine: a shorter probe
        result, timing = _timed_train([*overrides, *_step_overrides(probe), f"module.scheduler.total_steps={preset}",
                                       *clock_overrides(*clock_args, stop_at=stop_at)], run_dir)
        entry["probe"] = timing.as_dict()
        done = timing.steps  # fewer than probe when the probe ran out of time
        planned, max_time = plan_steps(stage_end - time.time(), timing, done, preset, settings.max_step_factor,
                                       settings.plan_fraction)
        entry["planned_steps"] = planned
        if planned > done:
            budget.say(stage, f"{timing.step_s:.3f} s/step: resuming to step {planned} (max_time {max_time:.0f} s)")
            (run_dir / "metrics.json").unlink(missing_ok=True)  # the probe's validation: not the stage's result
            result, timing = _timed_train([*overrides, *_step_overrides(planned), "resume=true",
                                           f"++trainer.max_time={{seconds:{max_time:.1f}}}",
                                           *clock_overrides(*clock_args)], run_dir)
            entry["run"] = timing.as_dict()
        else:
            budget.say(stage, f"{timing.step_s:.3f} s/step: no time for more steps, the probe is the stage's run")
            entry["planned_steps"] = probe  # what the probe aimed for: fewer reached means its time ran out
    if (run_dir / "metrics.json").is_file():
        result["metrics"] = json.loads((run_dir / "metrics.json").read_text())
    entry["steps"] = int((result.get("metrics") or {}).get("global_step", 0))
    # what ended training: the step count, max_time (the continuation) or the probe's own stop
    entry["stopped_by"] = ("steps" if entry["steps"] >= entry["planned_steps"] else
                           "max_time" if "run" in entry else "probe time")
    return {**entry, **result}


def embed_once(emb_dir: Path, clip_ckpt: str, shards: list[str], budget: Budget) -> dict:
    """Embed the demo shards with the trained CLIP (``unclip-embed``, caption encodings stored): the prior and the
    decoder then read z_i, z_t and the caption's token encodings from disk instead of running the frozen CLIP on
    every batch (the paper's set-up). A folder made by an earlier run with the same CLIP is reused shard by shard;
    one made with another CLIP (the CLIP retrained) is replaced."""
    from unclip.data.embeddings import META_FILE, read_meta
    from unclip.embed import run_embed
    from unclip.models.clip_embedder import clip_meta

    start = time.time()
    if (emb_dir / META_FILE).is_file() and read_meta(emb_dir).get("clip_hash") != clip_meta(clip_ckpt)["clip_hash"]:
        shutil.rmtree(emb_dir)
    budget.say("embed", "z_i, z_t and caption encodings of the train and val shards with the trained CLIP")
    record = run_embed(clip_ckpt, shards, str(emb_dir), batch_size=256, num_workers=0, rank=0, world_size=1,
                       device="cpu", progress=False, store_token_encodings=True)
    seconds = round(time.time() - start, 1)
    budget.say("embed", f"done in {clock(seconds)}: {record['samples']} samples embedded, "
                        f"{record['shards_skipped']} shards reused")
    return {"status": "embedded" if record["shards_written"] else "reused", "samples": record["samples"],
            "seconds": seconds, "out_dir": str(emb_dir)}


def _embedding_overrides(stage: str, emb_dir: Path) -> list[str]:
    """The prior and the decoder read the CLIP's embeddings from ``emb_dir``; the prior needs no pixels at all."""
    if stage == "prior":
        return [f"data.embeddings={emb_dir}", "data.decode_images=false"]
    return [f"data.embeddings={emb_dir}"] if stage == "decoder" else []


def _step_overrides(steps: int) -> list[str]:
    """Train ``steps`` steps, validating and checkpointing at the end of them."""
    return [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            f"callbacks.checkpoint.every_n_train_steps={steps}"]


def run_demo(out: Path, steps: int | None = None, extra: list[str] | None = None, fresh: bool = False,
             eval_samples: int = 128, budget_minutes: float | None = None) -> dict:
    """Train every stage on the demo data (reusing stages finished by an earlier run), evaluate, write report.md.

    :param steps: steps per stage (overrides the budget).
    :param budget_minutes: wall-clock minutes for the whole demo (None: conf/demo.yaml's; 0: no budget, the
        presets' steps).
    """
    from unclip.data.demo_shapes import DemoShapesConfig, ensure_demo_shards
    from unclip.data.inspect import check_shards

    register_resolvers()
    settings = BudgetSettings.load(CONF_DIR / "demo.yaml")
    minutes = settings.budget_minutes if budget_minutes is None else budget_minutes
    budget = Budget(time.time(), minutes * 60.0 if minutes > 0 and steps is None else None, settings)
    budget.say("data", "demo shapes (generated on first use) and their check")
    shards = ensure_demo_shards(DemoShapesConfig())
    summary: dict = {"data": {"shards": shards, "val_check": check_shards([shards["val"]], image_size=64)},
                     "budget": None if budget.seconds is None else {
                         "minutes": minutes, "seconds": budget.seconds, "shares": settings.shares,
                         "max_step_factor": settings.max_step_factor},
                     "stages": {}}
    summary["data"]["seconds"] = round(time.time() - budget.start, 1)
    chain: list[str] = []
    checkpoints: dict[str, str] = {}
    retrained = False
    parts = [stage for stage, _, _ in STAGES] + (["eval"] if eval_samples > 0 else [])
    for i, (stage, experiment, ckpt_key) in enumerate(STAGES):
        run_dir = out / stage
        result = None if fresh else _finished(run_dir)
        if result is not None:
            budget.say(stage, f"reusing {result['last_checkpoint']}")
            summary["stages"][stage] = {"status": "reused", "steps": result["metrics"].get("global_step"),
                                        **result}
        else:
            overrides = [f"stage={stage}", f"experiment={experiment}", f"run_dir={run_dir}", *chain,
                         *_embedding_overrides(stage, out / EMBED_DIR), *(extra or [])]
            stage_start = time.time()
            result = train_stage(stage, overrides, run_dir, budget, parts[i + 1:], steps)
            result["seconds"] = round(time.time() - stage_start, 1)
            budget.say(stage, f"done in {clock(result['seconds'])}, {result['steps']} steps "
                              f"(preset {result['preset_steps']})")
            summary["stages"][stage] = {"status": "trained", **result}
            retrained = True
        ckpt = result["last_checkpoint"]
        checkpoints[ckpt_key] = f"[{ckpt}]" if ckpt_key == "upsampler_ckpts" else ckpt
        chain.append(f"{ckpt_key}={checkpoints[ckpt_key]}")
        if stage == "clip":  # the frozen CLIP's embeddings, once: the prior and decoder read them from disk
            summary["embed"] = embed_once(out / EMBED_DIR, ckpt, [shards["train"], shards["val"]], budget)
    if eval_samples > 0:
        eval_start = time.time()
        allotted = max(0.0, budget.remaining())
        limit = None if budget.seconds is None else max(1.0, allotted - EVAL_AFTER_S)
        budget.say("eval", f"sampling and scoring up to {eval_samples} val captions"
                           + (f" in {clock(allotted)}" if limit is not None else ""))
        report = run_eval(out, checkpoints, shards["val"], eval_samples, reuse=not (fresh or retrained),
                          max_seconds=limit)
        summary["eval"] = {k: report.get(k) for k in ("status", "num_samples", "num_samples_requested", "stopped_by",
                                                      "fid", "fd_clip", "kid_mean", "precision", "recall",
                                                      "clip_score", "caption_accuracy", "ablation")}
        summary["eval"]["seconds"] = round(time.time() - eval_start, 1)
        if budget.seconds is not None:
            summary["eval"].update(share=settings.shares["eval"], allotted_s=round(allotted, 1))
        budget.say("eval", f"done in {clock(summary['eval']['seconds'])}")
    summary["seconds"] = round(time.time() - budget.start, 1)
    if summary["budget"] is not None:
        summary["budget"]["within"] = summary["seconds"] <= budget.seconds
    budget.say("demo", f"finished in {clock(summary['seconds'])}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out, summary, report if eval_samples > 0 else None)
    return summary


def main(argv: list[str] | None = None) -> int:
    settings = BudgetSettings.load(CONF_DIR / "demo.yaml")
    parser = argparse.ArgumentParser(prog="unclip-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where runs and summary.json go")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help=f"wall-clock minutes for the whole demo (default {settings.budget_minutes:g}, "
                             f"conf/demo.yaml: under 20 minutes with start-up on a slow 2-core CPU); each stage "
                             f"trains the steps that fit its share; 0: the presets' step counts, no time limit")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per stage (overrides the budget; default: as many as fit it)")
    parser.add_argument("--fresh", action="store_true", help="retrain stages that an earlier run finished")
    parser.add_argument("--eval-samples", type=int, default=128,
                        help="val captions sampled for the evaluation (0: skip it)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage, e.g. data.num_workers=0")
    args = parser.parse_args(argv)
    summary = run_demo(args.out, args.steps, args.overrides, args.fresh, args.eval_samples, args.budget_minutes)
    print(json.dumps(summary, indent=2))
    print(f"report: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
