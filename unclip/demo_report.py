"""``runs/demo/report.md``: the demo's numbers and pictures in one page a human reads first."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

STAGE_METRICS = {  # the validation numbers that say whether each stage learned (metrics.json keys)
    "clip": ("val/i2t_recall@1", "val/t2i_recall@1", "val/hard_negative_accuracy", "val/loss"),
    "prior": ("val/cos_pred", "val/cos_text", "val/cos_shuffled"),
    "decoder": ("val/mse", "val/loss"),
    "upsampler": ("val/psnr", "val/psnr_bicubic"),
}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _stage_rows(stages: dict) -> list[str]:
    rows = ["| stage | status | share | allotted s | seconds | steps (preset) | stopped by | validation |",
            "|---|---|---|---|---|---|---|---|"]
    for stage, entry in stages.items():
        metrics = entry.get("metrics") or {}
        shown = ", ".join(f"{k.split('/', 1)[1]} {_fmt(metrics[k])}" for k in STAGE_METRICS.get(stage, ())
                          if k in metrics)
        steps = f"{_fmt(entry.get('steps'))} ({_fmt(entry.get('preset_steps'))})"
        rows.append(f"| {stage} | {entry.get('status')} | {_fmt(entry.get('share'))} | {_fmt(entry.get('allotted_s'))} "
                    f"| {_fmt(entry.get('seconds'))} | {steps} | {_fmt(entry.get('stopped_by'))} | {shown or '–'} |")
    return rows


def _budget_lines(summary: dict) -> list[str]:
    """The budget, what each part used of it and the total (unclip.demo_budget)."""
    budget = summary.get("budget")
    if not budget:
        return ["No time budget: every stage trained a fixed step count."]
    parts = {**summary["stages"], **({"eval": summary["eval"]} if summary.get("eval") else {})}
    if summary.get("embed"):  # between the CLIP and the prior (unclip.demo.embed_once)
        parts = {"clip": parts.pop("clip"), "embed": summary["embed"], **parts} if "clip" in parts else parts
    used = ", ".join(f"{name} {_fmt(entry.get('seconds'))} s" for name, entry in parts.items())
    verdict = "within" if budget.get("within") else "OVER"
    return [f"Budget: {_fmt(budget['minutes'])} min ({_fmt(budget['seconds'])} s), shared as "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in budget["shares"].items())
            + " (each part gets its share of the time still left, so unused time rolls over).",
            f"Used: data {_fmt(summary['data'].get('seconds'))} s, {used}; total {_fmt(summary.get('seconds'))} s, "
            f"{verdict} the budget. Steps: each stage's first steps are timed, then it trains the steps that fit "
            f"its time (at most {_fmt(budget.get('max_step_factor'))}x the preset's), with Lightning's max_time as "
            f"the hard stop."]


def _accuracy_rows(report: dict) -> list[str]:
    acc, real, chance = (report.get(k) for k in ("caption_accuracy", "caption_accuracy_real",
                                                 "caption_accuracy_chance"))
    if not acc or not real or not chance:  # written together by unclip-eval on the demo data
        return []
    rows = ["| samples | n | shape | colour | background | size | position | all |",
            "|---|---|---|---|---|---|---|---|"]
    for label, block in (("generated, seen pairs", acc["seen"]), ("generated, held-out pairs", acc["held_out"]),
                         ("real val images (checker)", real["all"])):
        rows.append(f"| {label} | {int(block['n'])} | " + " | ".join(
            _fmt(block[k]) for k in ("shape", "color", "background", "size", "position", "all")) + " |")
    rows.append("| chance | | " + " | ".join(_fmt(chance.get(k)) for k in ("shape", "color", "background", "size",
                                                                            "position")) + " | |")
    return rows


ABLATION_ROWS = (  # (report.json ablation key, stage, its baseline)
    ("prior_vs_caption_embedding", "prior (z_i sampled from the caption)", "caption embedding z_t decoded directly"),
    ("upsampler_vs_bicubic", "upsampler (on the chain's base samples)", "bicubic (the same base samples)"),
)
STAGE_BASELINES = {  # a stage's validation number against its baseline's (row name, metric, metrics.json keys)
    "prior": ("prior vs caption embedding", "cos to the true z_i", "val/cos_pred", "val/cos_text"),
    "upsampler": ("upsampler vs bicubic", "val PSNR (dB) on real low-res images", "val/psnr", "val/psnr_bicubic"),
}


def _signed(value: Any) -> str:
    return "–" if value is None else f"{value:+.4g}"


def _gain_rows(report: dict, stages: dict) -> list[str]:
    """"What each stage adds": every stage against its baseline on the same inputs, margin > 0 = the stage wins."""
    ablation = report.get("ablation") or {}
    rows = ["| stage vs baseline | metric | stage | baseline | margin (+ = stage better) |", "|---|---|---|---|---|"]
    for stage, (name, label, ours, theirs) in STAGE_BASELINES.items():
        metrics = (stages.get(stage) or {}).get("metrics") or {}
        if ours in metrics and theirs in metrics:
            a, b = metrics[ours], metrics[theirs]
            rows.append(f"| {name} | {label} | {_fmt(a)} | {_fmt(b)} | {_signed(a - b)} |")
    for key, stage, baseline in ABLATION_ROWS:
        entry = ablation.get(key)
        if not entry:
            continue
        s, b, margin = entry["stage"], entry["baseline"], entry["margin"]
        name = f"{stage} vs {baseline}"
        for metric, label in (("fd_clip", "FD-CLIP ↓"), ("fid", "FID ↓")):
            if s.get(metric) is not None:
                rows.append(f"| {name} | {label} | {_fmt(s[metric])} | {_fmt(b[metric])} | {_signed(margin[metric])} |")
        real = entry.get("psnr_real")
        if real:  # real val images restored from the base size both ways, with the evaluation's sampling
            rows.append(f"| {name} | PSNR (dB) ↑ on {real['n']} real val images | {_fmt(real['upsampler'])} | "
                        f"{_fmt(real['bicubic'])} | {_signed(real['margin'])} |")
        for attr in ("shape", "all"):
            sa, ba = ((block.get("caption_accuracy") or {}).get("all", {}).get(attr) for block in (s, b))
            if sa is not None and ba is not None:
                rows.append(f"| {name} | caption accuracy, {attr} ↑ | {_fmt(sa)} | {_fmt(ba)} | "
                            f"{_signed(margin[f'caption_accuracy_{attr}'])} |")
    return rows if len(rows) > 2 else []


def write_report(out: Path, summary: dict, report: dict | None) -> Path:
    """Write ``out/report.md`` from the demo summary and the evaluation report (grid paths relative to ``out``)."""
    lines = ["# unclip demo", "",
             "Tiny CLIP → prior → decoder → upsampler trained on the built-in demo shapes (generated on first use, "
             "no download) on this machine, then evaluated on the val split. Held-out colour×shape pairs never "
             "appear in training: their caption accuracy measures composition, not memory.", "",
             f"Total time: {_fmt(summary.get('seconds'))} s.", "", "## Stages", "", *_stage_rows(summary["stages"]),
             "", *_budget_lines(summary)]
    if report:
        sampled = str(report["num_samples"])
        if report.get("stopped_by") == "max_seconds":
            sampled += (f" of {report['num_samples_requested']} (the evaluation's share of the budget ran out; "
                        f"a longer --budget-minutes samples more)")
        lines += ["", "## Text → image evaluation", "",
                  f"{sampled} val captions, {report['image_size']}px samples "
                  f"(prior {report['steps']['prior']} steps, decoder {report['steps']['decoder']}, upsamplers "
                  f"{report['steps']['upsamplers']}; guidance {report['guidance']}).", "",
                  "| metric | value |", "|---|---|"]
        for key in ("fid", "fd_clip", "kid_mean", "kid_std", "precision", "recall", "clip_score"):
            lines.append(f"| {key} | {_fmt(report.get(key))} |")
        lines += ["", f"Features: {report['feature_extractor']}."]
        if report.get("fid") is None and report.get("fid_note"):
            lines.append(f"FID: {report['fid_note']}.")
        lines.append(f"CLIP scorer: {report['clip_scorer']}.")
        if report.get("clip_scorer_warning"):
            lines.append(f"Note: {report['clip_scorer_warning']}.")
        accuracy = _accuracy_rows(report)
        if accuracy:
            lines += ["", "### Caption accuracy (the demo data's own checker)", "", *accuracy]
        gains = _gain_rows(report, summary.get("stages") or {})
        if gains:
            lines += ["", "### What each stage adds", "",
                      "Each stage against its baseline on the same captions and random draws (unclip-eval's "
                      "ablation): the prior against decoding the caption's own CLIP embedding (unCLIP §5.1), the "
                      "upsampler against bicubic on the same base samples; validation numbers from the stage runs.",
                      "", *gains]
        lines += ["", "### Samples", "", "![samples](eval/grid.png)", "", "Captions, row by row:", ""]
        grid_txt = out / "eval" / "grid.txt"
        if grid_txt.is_file():
            lines += [f"{i + 1}. {c}" for i, c in enumerate(grid_txt.read_text().splitlines())]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
