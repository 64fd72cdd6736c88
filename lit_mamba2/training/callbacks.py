"""Callbacks: token throughput, a checkpoint on SIGTERM, the step of the last validation, the recipe in every
checkpoint, and pushing the trained model to the Hugging Face Hub."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lit_mamba2.training.data import data_parallel_rank_and_size


class TokenThroughput(L.Callback):
    """Logs train/tokens (the world's: every data-parallel rank's rows) and train/tokens_per_s over the last
    `window` batches.

    Token counts come from batch shapes and times from the host clock, so nothing waits for the device; over a
    window of batches the host cannot run ahead of the device by more than the queue depth, so the rate is right."""

    def __init__(self, window: int = 20):
        self.window = window
        self.times: deque = deque(maxlen=window + 1)
        self.tokens: deque = deque(maxlen=window + 1)
        self.total = 0

    def on_validation_end(self, trainer, pl_module) -> None:
        self.times.clear()  # the window measures training only
        self.tokens.clear()

    def on_train_start(self, trainer, pl_module) -> None:
        self.times.clear()
        self.tokens.clear()
        self.data_ranks = data_parallel_rank_and_size(trainer)[1]  # (cp and tp ranks share their rows)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.total += batch["input_ids"].numel() * self.data_ranks
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


class RecipeInCheckpoint(L.Callback):
    """Stores the run's recipe (the resolved PretrainConfig as YAML data) in every checkpoint, as "recipe": the
    model card of `lit-mamba2 push` shows it."""

    def __init__(self, recipe: dict):
        self.recipe = recipe

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["recipe"] = self.recipe


def full_model(model):
    """The whole model on rank 0, on CPU (a sharded model's parameters gathered: every rank must call this);
    None on other ranks of a sharded model."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from lit_mamba2.model import Mamba2LMHeadModel

    model = getattr(model, "_orig_mod", model)
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        whole = Mamba2LMHeadModel(model.config)
    whole.to_empty(device="cpu")
    whole.load_state_dict(sd)
    return whole.eval()


class PushToHub(L.Callback):
    """Pushes the trained model (weights, config, tokenizer, model card with the recipe) to the Hub at the end of
    training (`hub.revision`), and with `hub.checkpoints_branch` at every checkpoint too (one commit each, uploaded
    in the background, in order). The model pushed is the one in memory, gathered whole under FSDP2 (every rank
    takes part; rank 0 uploads). When an `EvalCallback` scored the final step, its results go into the card.

    A missing token fails at the start; a failed upload at the end is a warning (the checkpoint is kept: push it
    with `lit-mamba2 push`), so that it never costs the run."""

    def __init__(self, cfg, recipe: Optional[dict] = None, evaluator=None):
        self.cfg = cfg
        self.recipe = recipe
        self.evaluator = evaluator
        self.api = None
        self.pending: list = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        from lit_mamba2.hub import hub_api

        if trainer.is_global_zero and self.api is None:
            self.api = hub_api()  # no token: an error before any step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.cfg.checkpoints_branch and not trainer.received_sigterm and trainer.state.fn == "fit":
            self._push(trainer, pl_module, self.cfg.checkpoints_branch, f"step {trainer.global_step}", wait=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._push(trainer, pl_module, self.cfg.revision, f"Trained model, step {trainer.global_step}", wait=True)

    def _push(self, trainer, pl_module, revision: Optional[str], message: str, wait: bool) -> None:
        from lit_mamba2.hub import upload, write_folder

        model = full_model(pl_module.model)  # (a collective under FSDP2)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        ev = self.evaluator
        results = ev.record if ev is not None and ev.record is not None and ev.last_step == step else None
        folder = Path(tempfile.mkdtemp(prefix="lit-mamba2-push-"))
        try:
            write_folder(folder, model, pl_module.tokenizer, self.cfg.repo_id, self.cfg.format, self.cfg.card,
                         results=results, recipe=self.recipe, trained_steps=step)
            future, repo_id = upload(folder, self.cfg.repo_id, private=self.cfg.private, revision=revision,
                                     commit_message=message, api=self.api, run_as_future=True)
        except Exception as e:  # noqa: BLE001 - the Hub fails in many ways; training must not
            shutil.rmtree(folder, ignore_errors=True)
            rank_zero_warn(f"push to {self.cfg.repo_id} ({revision or 'main'}) at step {step} failed: "
                           f"{type(e).__name__}: {e}")
            return
        future.add_done_callback(lambda _: shutil.rmtree(folder, ignore_errors=True))
        self.pending.append((future, revision, step))
        if wait:
            self.wait()

    def wait(self) -> None:
        """Waits for every upload started; a failed one is a warning naming its branch and step."""
        for future, revision, step in self.pending:
            try:
                info = future.result()
                rank_zero_info(f"pushed step {step} to {info.commit_url}")
            except Exception as e:  # noqa: BLE001
                rank_zero_warn(f"push to {self.cfg.repo_id} ({revision or 'main'}) at step {step} failed: "
                               f"{type(e).__name__}: {e}")
        self.pending.clear()
