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
    state there, as `path`, so `--resume` continues from that batch. The save is atomic (written aside, then moved)."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            rank_zero_info(f"SIGTERM: saved {self.path} at step {trainer.global_step}")


class LastValidationStep(L.Callback):
    """Remembers the global step at which validation last ran inside fit (-1: never), so that the end of a run
    validates only if the final weights have not been validated yet."""

    def __init__(self):
        self.step = -1

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step
