"""``unclip-demo --budget-minutes``: a wall-clock budget shared by the demo's stages (conf/demo.yaml).

Each stage gets its share of the time that remains (so a stage that finishes early leaves its time to the later
ones). It trains its first ``probe_steps`` as a probe through the real runner, timed by :class:`BudgetClock`:
set-up (config checks, data, model and CLIP build), the first batch's overhead, the steady seconds per step (data
loading and on-the-fly CLIP embedding included), one validation and the checkpoint saves. :func:`plan_steps` turns
that into the step count that fits the rest of the stage's time, and the run resumes from the probe's checkpoint
with ``trainer.max_steps`` (hence the LR schedule's end, the validation and the final checkpoint) set to it and
Lightning's ``max_time`` as the hard stop. The probe's steps lie inside the learning-rate warm-up, which does not
depend on the schedule's length, so probe + resume trains as one run of the planned length would.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf

from unclip.checkpoints import atomic_write_json
from unclip.config import ConfigError


@dataclass(frozen=True)
class BudgetSettings:
    """conf/demo.yaml: the default budget, each part's share and how steps are planned."""

    budget_minutes: float
    shares: dict[str, float]
    probe_steps: int
    probe_fraction: float
    plan_fraction: float
    max_step_factor: float
    progress_every_s: float

    @classmethod
    def load(cls, path: str | Path) -> BudgetSettings:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        assert isinstance(raw, dict)
        try:
            settings = cls(**{str(k): v for k, v in raw.items()})
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        for name, share in settings.shares.items():
            if not share > 0:
                raise ConfigError(f"{path}: shares.{name} must be > 0, got {share}")
        if settings.probe_steps < 2:  # one step only shows the first batch's overhead, no steady step
            raise ConfigError(f"{path}: probe_steps must be >= 2, got {settings.probe_steps}")
        for name in ("probe_fraction", "plan_fraction"):
            if not 0 < getattr(settings, name) <= 1:
                raise ConfigError(f"{path}: {name} must be in (0, 1], got {getattr(settings, name)}")
        return settings


def allotment(remaining_s: float, shares: Mapping[str, float], part: str, later: Sequence[str]) -> float:
    """Seconds ``part`` may use: its share of what remains of the budget against the parts still to run
    (``part`` and ``later``), so time an earlier part left unused rolls over and an overrun is paid back."""
    total = shares[part] + sum(shares[p] for p in later)
    return max(0.0, remaining_s) * shares[part] / total


@dataclass(frozen=True)
class Timing:
    """Where a training run's wall-clock time went (``time.time()`` stamps; :class:`BudgetClock` records them).

    :param call: ``train()`` called.
    :param train_start: Lightning's ``on_train_start`` (where ``max_time``'s clock starts).
    :param first_batch_end: the run's first optimiser step done.
    :param last_batch_end: its last step done.
    :param steps: optimiser steps this run took.
    :param val_s: seconds spent validating inside the run.
    :param end: ``train()`` returned (after the last validation and checkpoint saves).
    """

    call: float
    train_start: float
    first_batch_end: float
    last_batch_end: float
    steps: int
    val_s: float
    end: float

    @property
    def step_s(self) -> float:
        """Steady seconds per step: the steps after the first (which carries one-off overhead)."""
        return (self.last_batch_end - self.first_batch_end) / max(1, self.steps - 1)

    @property
    def pre_s(self) -> float:
        """Before ``max_time``'s clock starts: config checks, data and model build, checkpoint restore."""
        return self.train_start - self.call

    @property
    def warm_s(self) -> float:
        """The first step's overhead beyond a steady step (lazy initialisation, first data)."""
        return max(0.0, self.first_batch_end - self.train_start - self.step_s)

    @property
    def after_s(self) -> float:
        """After the last step, besides validation: checkpoint saves and teardown."""
        return max(0.0, self.end - self.last_batch_end - self.val_s)

    def as_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "seconds": round(self.end - self.call, 2), "pre_s": round(self.pre_s, 2),
                "warm_s": round(self.warm_s, 2), "step_s": round(self.step_s, 4), "val_s": round(self.val_s, 2),
                "after_s": round(self.after_s, 2)}


def read_timing(record: Path, call: float, end: float) -> Timing:
    """The :class:`Timing` of a run whose :class:`BudgetClock` wrote ``record``."""
    raw = json.loads(record.read_text())
    return Timing(call=call, end=end, **{k: raw[k] for k in ("train_start", "first_batch_end", "last_batch_end",
                                                            "steps", "val_s")})


def plan_steps(available_s: float, probe: Timing, done: int, preset_steps: int, max_step_factor: float,
               plan_fraction: float) -> tuple[int, float]:
    """Steps (in all, the probe's ``done`` included) and ``max_time`` seconds for the run that continues the probe.

    The continuation pays the probe's set-up, first-step overhead, validation and saves again (one final validation
    and checkpoint); ``plan_fraction`` of the time left for steps is planned at the probe's steady step time, the
    rest is slack that ``max_time`` (the whole time left for steps) allows before it stops the run. Never more than
    ``max_step_factor`` times the preset's steps. ``(done, 0.0)`` when not even one more step fits.

    :param available_s: seconds the stage has left after its probe.
    """
    max_time = available_s - probe.pre_s - probe.val_s - probe.after_s
    steps_s = max_time - probe.warm_s
    more = math.floor(plan_fraction * steps_s / probe.step_s) if steps_s > 0 and probe.step_s > 0 else 0
    total = min(done + max(0, more), math.floor(max_step_factor * preset_steps))
    if total <= done:
        return done, 0.0
    return total, max_time


def clock(seconds: float) -> str:
    """``m:ss`` (``-m:ss`` when negative)."""
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    return f"{sign}{int(seconds // 60)}:{int(seconds % 60):02d}"


def progress_line(label: str, message: str, start: float, budget_s: float | None, now: float | None = None) -> str:
    """``unclip-demo [elapsed / budget, left] label: message``: what runs and how much of the budget is left."""
    elapsed = (time.time() if now is None else now) - start
    where = (f"{clock(elapsed)} / {clock(budget_s)}, {clock(budget_s - elapsed)} left" if budget_s is not None
             else clock(elapsed))
    return f"unclip-demo [{where}] {label}: {message}"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class BudgetClock(pl.Callback):
    """Times a training run for the demo's budget and prints a progress line at its start, every ``every_s`` seconds
    and at its end (stderr). Writes ``record`` (JSON: the stamps :class:`Timing` reads) when training ends.

    :param label: the stage, as the lines name it.
    :param budget_start: ``time.time()`` when the demo's budget started.
    :param budget_s: the budget in seconds (None: no budget, elapsed time only).
    :param stage_end: ``time.time()`` by which the stage should be done (None: no limit shown).
    :param every_s: seconds between progress lines while training.
    :param record: where the timing JSON goes (None: nowhere).
    :param stop_at: ``time.time()`` after which training stops at the next step boundary, validating and saving
        ``last.ckpt`` as at its end (the demo's probe; single-process runs only). Not Lightning's ``max_time``: its
        Timer keeps its elapsed time in the checkpoint, which the resumed run would count again.
    """

    def __init__(self, label: str, budget_start: float, budget_s: float | None = None,
                 stage_end: float | None = None, every_s: float = 30.0, record: str | None = None,
                 stop_at: float | None = None) -> None:
        self.label = label
        self.budget_start = float(budget_start)
        self.budget_s = None if budget_s is None else float(budget_s)
        self.stage_end = None if stage_end is None else float(stage_end)
        self.every_s = float(every_s)
        self.record = record
        self.stop_at = None if stop_at is None else float(stop_at)
        self._stamps: dict[str, Any] = {"val_s": 0.0}
        self._start_step = 0
        self._last_line = 0.0
        self._val_start: float | None = None

    def _say(self, trainer: pl.Trainer, message: str) -> None:
        if not trainer.is_global_zero:
            return
        if self.stage_end is not None:
            message += f" (stage: {clock(self.stage_end - time.time())} left)"
        say(progress_line(self.label, message, self.budget_start, self.budget_s))
        self._last_line = time.time()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stamps["train_start"] = time.time()
        self._start_step = trainer.global_step
        self._say(trainer, f"training from step {trainer.global_step} to {trainer.max_steps}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.time()
        self._stamps.setdefault("first_batch_end", now)
        self._stamps["last_batch_end"] = now
        if self.stop_at is not None and now >= self.stop_at and not trainer.should_stop:
            trainer.should_stop = True
            self._say(trainer, f"out of probe time at step {trainer.global_step}: stopping")
            return
        if now - self._last_line >= self.every_s:
            steps = trainer.global_step - self._start_step
            rate = (now - self._stamps["train_start"]) / max(1, steps)
            self._say(trainer, f"step {trainer.global_step}/{trainer.max_steps}, {rate:.2f} s/step")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_start = time.time()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None:
            self._stamps["val_s"] += time.time() - self._val_start
            self._val_start = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stamps["steps"] = trainer.global_step - self._start_step
        self._say(trainer, f"training stopped at step {trainer.global_step}/{trainer.max_steps}")
        if self.record is not None and trainer.is_global_zero:
            atomic_write_json(self.record, self._stamps, indent=2)


def clock_overrides(label: str, budget_start: float, budget_s: float | None, stage_end: float | None,
                    every_s: float, record: Path, stop_at: float | None = None) -> list[str]:
    """Hydra overrides adding a :class:`BudgetClock` to a training run's callbacks."""
    node = "+callbacks.budget_clock"
    return [f"{node}._target_=unclip.demo_budget.BudgetClock", f"{node}.label={label}",
            f"{node}.budget_start={budget_start!r}", f"{node}.budget_s={'null' if budget_s is None else budget_s}",
            f"{node}.stage_end={'null' if stage_end is None else repr(stage_end)}", f"{node}.every_s={every_s}",
            f"{node}.record={record}", f"{node}.stop_at={'null' if stop_at is None else repr(stop_at)}"]
