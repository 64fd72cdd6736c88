"""Evaluation during training: every `every_n_steps` optimizer steps, lm-eval tasks (a small `limit`) are scored on
the model being trained and logged beside the other metrics as `eval/<task>/<metric>`.

The training model is wrapped as it is (`LitMamba2LM(model, tokenizer=...)`, no copy, no checkpoint). Under a
sharded strategy (FSDP2) a forward needs every rank, so every rank runs the same requests in lockstep: the LM
reports rank 0 of a world of 1 to lm-eval on every process, so that lm-eval splits nothing; only global rank 0 logs.
Tasks that generate (generate_until) are refused under FSDP2 (the decoder reads whole weights). The random states of
Python, NumPy and torch are restored afterwards (lm-eval seeds them), so evaluating does not change training.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Optional, Union

import lightning as L
import numpy as np
import torch

from lit_mamba2.evals.run import task_manager


@dataclass
class EvalConfig:
    """lm-eval tasks scored during training (the `eval:` section of a recipe).

    Args:
        tasks: lm-eval task names (a list, or comma-separated); none (the default): no evaluation while training
        every_n_steps: score them every this many optimizer steps
        limit: documents per task (a fraction below 1); null: all
        num_fewshot: few-shot examples per task (default: each task's own, else 0)
        include_path: a folder of extra task YAML files
        batch_size: rows per forward pass
        max_length: tokens a row keeps (longer contexts keep their last tokens)
        seed: seed of lm-eval's sampling (few-shot examples)
    """

    tasks: Union[str, list[str], None] = None
    every_n_steps: int = 1000
    limit: Optional[float] = 100
    num_fewshot: Optional[int] = None
    include_path: Optional[str] = None
    batch_size: int = 16
    max_length: int = 2048
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if self.tasks is not None:
            self.tasks = [t.strip() for s in self.tasks for t in str(s).split(",") if t.strip()] or None
        for name in ("every_n_steps", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"eval.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"eval.limit must be positive (or null for all), got {self.limit}")
        if self.include_path is not None and not os.path.isdir(os.path.expanduser(self.include_path)):
            raise ValueError(f"eval.include_path {self.include_path}: no such folder")


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """lm-eval's results -> {"eval/<task>/<metric>": value} (filter "none" left out of the name, stderrs left out)."""
    out = {}
    for task, values in results.items():
        for key, v in values.items():
            if "," not in key or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            out[f"{prefix}/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(v)
    return out


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class EvalCallback(L.Callback):
    """Scores `cfg.tasks` every `cfg.every_n_steps` optimizer steps on `pl_module.model` with its tokenizer and
    logs `eval/<task>/<metric>` at that step (global rank 0 only)."""

    def __init__(self, cfg: EvalConfig):
        if not cfg.tasks:
            raise ValueError("eval.tasks: name at least one lm-eval task")
        self.cfg = cfg
        self.manager = None
        self.last_step = -1
        self.checked = False  # the tasks were checked against the model's layout
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, metrics) of each evaluation, on rank 0
        self.record: Optional[dict] = None  # the last evaluation as `lit-mamba2 evaluate` records it (rank 0)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.manager is None:
            self.manager = task_manager(self.cfg.tasks, self.cfg.include_path, "eval.tasks", "eval.include_path")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.last_step or step == 0 or step % self.cfg.every_n_steps:
            return  # (with gradient accumulation, several batches end at one step)
        self.last_step = step
        metrics = self.evaluate(pl_module.model, pl_module.tokenizer, pl_module.device)
        if trainer.is_global_zero and metrics:
            self.record = {**self._last, "step": step}
            self.history.append((step, metrics))
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def evaluate(self, model: torch.nn.Module, tokenizer, device) -> dict[str, float]:
        """The tasks' metrics for `model` as it is now ({} on processes other than local rank 0, which run the
        same requests but get no results from lm-eval)."""
        import lm_eval

        from lit_mamba2.evals.harness import LitMamba2LM

        if tokenizer is None:
            raise ValueError("eval.tasks: the model has no tokenizer (synthetic data); lm-eval tasks need one")
        if self.manager is None:
            self.manager = task_manager(self.cfg.tasks, self.cfg.include_path, "eval.tasks", "eval.include_path")
        if not self.checked and _is_sharded(model):
            loaded = self.manager.load(list(self.cfg.tasks))["tasks"]
            generating = [n for n, t in loaded.items() if t.config.output_type == "generate_until"]
            self.checked = True
            if generating:
                raise ValueError(f"eval.tasks: {', '.join(generating)} generate text, which the sharded model "
                                 "(trainer.strategy fsdp) cannot do during training; evaluate a checkpoint instead")
        cfg = self.cfg
        limit = cfg.limit if cfg.limit is None or cfg.limit < 1 else int(cfg.limit)
        was_training = model.training
        lm = LitMamba2LM(model, tokenizer=tokenizer, device=str(device), batch_size=cfg.batch_size,
                         max_length=cfg.max_length, cuda_graph=False)
        lm_logger = logging.getLogger("lm_eval")
        level = lm_logger.level
        lm_logger.setLevel(logging.WARNING)
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [device] if torch.device(device).type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=limit,
                    batch_size=cfg.batch_size, task_manager=self.manager, log_samples=False, bootstrap_iters=0,
                    random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                    fewshot_random_seed=cfg.seed)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            lm_logger.setLevel(level)
            model.train(was_training)
        if not out:
            return {}
        from lit_mamba2.evals.run import TASK_FIELDS

        self._last = {"results": out["results"], "n-shot": out.get("n-shot"), "limit": limit,
                      "configs": {t: {k: c.get(k) for k in TASK_FIELDS if c.get(k) is not None}
                                  for t, c in (out.get("configs") or {}).items()}}
        return flat_metrics(out["results"])
