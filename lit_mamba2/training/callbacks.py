"""Callbacks: token throughput, a checkpoint on SIGTERM, and the step of the last validation."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class TokenThroughput(L.Callback):
    """Logs train/tokens (all ranks) and train/tokens_per_s over the last `window` batches.

    Token counts come from batch shapes and times from the host clock, so nothing waits for the device; over a
    window of batches the host cannot run ahead of the device by more than the queue depth, so the rate is right."""

    def __init__(self, window: int = 20):
        self.window = window
        self.times: deque = deque(maxlen=window + 1)
        self.tokens: deque = deque(maxlen=window + 1)
        self.total = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.times.clear()
        self.tokens.clear()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.on_train_start(trainer, pl_module)  # the window measures training only

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.total += batch["input_ids"].numel() * trainer.world_size
        self.times.append(time.perf_counter())
        self.tokens.append(self.total)
        pl_module.log("train/tokens", float(self.total), on_step=True, on_epoch=False)
        if len(self.times) > 1:
            rate = (self.tokens[-1] - self.tokens[0]) / (self.times[-1] - self.times[0])
            pl_module.log("train/tokens_per_s", rate, on_step=True, on_epoch=False, prog_bar=True)


class CheckpointOnSigterm(L.Callback):
    """Lightning turns SIGTERM into a SIGTERMException after the current batch (on every rank); this saves the
    state there, as `path`, so `--resume` continues from that batch. The save is atomic (written aside, then moved).

    With gradient accumulation the signal can come inside an optimizer step's window of batches, whose gradients
    so far are not part of the state; the checkpoint then counts the batches back to the window's first, so that
    the resumed run redoes the whole window (the weights are still those from before it)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._saving = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._saving = True
            try:
                trainer.save_checkpoint(self.path)
            finally:
                self._saving = False
            rank_zero_info(f"SIGTERM: saved {self.path} at step {trainer.global_step}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        accumulate = trainer.accumulate_grad_batches
        if not self._saving or accumulate == 1:
            return
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        behind = progress["current"]["processed"] % accumulate  # batches of the unfinished window
        for part in ("total", "current"):
            start = progress[part]["processed"] - behind
            for counter in ("ready", "started", "processed", "completed"):
                progress[part][counter] = min(progress[part][counter], start)


def count_batches_in_steps(checkpoint: dict, accumulate: int) -> None:
    """Make a checkpoint's fit loop count its optimizer steps × `accumulate` batches as processed (its counters
    moved together, so that Lightning sees the same point of a batch's life), for a run resumed with another
    accumulation: the batches that the steps took on this layout."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    shift = checkpoint["global_step"] * accumulate - progress["total"]["processed"]
    for part in ("total", "current"):
        for counter in ("ready", "started", "processed", "completed"):
            progress[part][counter] += shift


class LastValidationStep(L.Callback):
    """Remembers the global step at which validation last ran inside fit (-1: never), so that the end of a run
    validates only if the final weights have not been validated yet."""

    def __init__(self):
        self.step = -1

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step
