"""`lit-mamba2 evaluate`: lm-evaluation-harness over a checkpoint through the `lit_mamba2` model
(lit_mamba2.evals.harness), by default on the paper's zero-shot suite; writes results.json and results.md (a
markdown table beside the paper's numbers for the matching published size)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from lit_mamba2.evals.paper import PAPER_RESULTS, TASK_METRICS

# what results.json keeps of each task's lm-eval config: where its data came from (the model card links it)
TASK_FIELDS = ("dataset_path", "dataset_name", "test_split", "validation_split", "num_fewshot", "output_type")


@dataclass
class EvaluateConfig:
    """The options of `lit-mamba2 evaluate`.

    Args:
        checkpoint: checkpoint folder, Hub repo id or training .ckpt
        tasks: lm-eval task names (repeat --tasks, or a comma-separated list); default: the paper's zero-shot suite
            (lambada_openai, hellaswag, piqa, arc_easy, arc_challenge, winogrande, openbookqa)
        num_fewshot: few-shot examples per task (default: each task's own, 0 for the paper's)
        limit: evaluate only this many documents per task (a fraction below 1)
        batch_size: rows per forward pass
        max_length: tokens a row keeps (longer contexts keep their last tokens)
        include_path: a folder of extra task YAML files
        output_path: folder for results.json and results.md
        tokenizer: tokenizer name or folder, or 'byte' (default: the checkpoint's own)
        dtype: parameter dtype; default: bfloat16 on CUDA, float32 on CPU
        device: default: cuda when available, else cpu
        paper: published model whose numbers the table shows beside ours (default: the one of the same shape)
        seed: random seed (few-shot sampling, sampling in generation)
    """

    checkpoint: str
    tasks: Union[str, list[str], None] = field(default=None, metadata={"repeatable": True})
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None
    batch_size: int = 16
    max_length: int = 2048
    include_path: Optional[str] = None
    output_path: str = "runs/evaluate"
    tokenizer: Optional[str] = None
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    device: Optional[str] = None
    paper: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if self.tasks is not None:
            self.tasks = [t.strip() for s in self.tasks for t in s.split(",") if t.strip()]
            if not self.tasks:
                raise ValueError("--tasks: give at least one task name")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"--max_length must be at least 2, got {self.max_length}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"--num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"--limit must be positive, got {self.limit}")
        if self.include_path is not None and not os.path.isdir(os.path.expanduser(self.include_path)):
            raise ValueError(f"--include_path {self.include_path}: no such folder")
        if self.paper is not None and self.paper not in PAPER_RESULTS:
            raise ValueError(f"--paper: one of {', '.join(PAPER_RESULTS)}, got {self.paper!r}")


def matching_paper_model(config) -> Optional[str]:
    """The published model with this config's shape (d_model, n_layer, attention layers), or None."""
    from lit_mamba2 import Mamba2Config

    for name in PAPER_RESULTS:
        ref = Mamba2Config.from_name(name)
        if (ref.d_model, ref.n_layer, list(ref.attn_layer_idx or [])) == \
                (config.d_model, config.n_layer, list(config.attn_layer_idx or [])):
            return name
    return None


def _metrics_of(task: str, values: dict) -> list[str]:
    """The metrics shown for a task: the paper's (and LAMBADA's perplexity), else every metric it reported."""
    names = sorted({k.split(",")[0] for k in values if "," in k and not k.split(",")[0].endswith("_stderr")})
    if task in TASK_METRICS:
        want = [TASK_METRICS[task]] + (["perplexity"] if task.startswith("lambada") else [])
        return [m for m in want if m in names]
    return names


def _value(values: dict, metric: str):
    for k, v in values.items():
        if k.split(",")[0] == metric and isinstance(v, (int, float)):
            stderr = values.get(k.replace(metric, metric + "_stderr", 1))
            return v, stderr if isinstance(stderr, (int, float)) else None
    return None, None


def markdown_table(results: dict, paper: Optional[str]) -> str:
    """One row per task and metric: ours (accuracies in percent, as the paper gives them) and the paper's."""
    head = f"| task | metric | ours | ± | paper{f' ({paper})' if paper else ''} |"
    lines = [head, "|---|---|---:|---:|---:|"]
    ref = PAPER_RESULTS.get(paper, {}) if paper else {}
    for task, values in results.items():
        for metric in _metrics_of(task, values):
            v, se = _value(values, metric)
            if v is None:
                continue
            pct = metric != "perplexity" and not metric.endswith("perplexity")
            scale = 100.0 if pct else 1.0
            ours = f"{v * scale:.1f}" if pct else f"{v:.2f}"
            err = "" if se is None or (isinstance(se, float) and math.isnan(se)) else \
                (f"{se * scale:.1f}" if pct else f"{se:.2f}")
            if pct and metric == TASK_METRICS.get(task):
                theirs = ref.get(task)
            elif metric == "perplexity":
                theirs = ref.get(f"{task}_ppl")
            else:
                theirs = None
            lines.append(f"| {task} | {metric} | {ours} | {err} | {'' if theirs is None else theirs} |")
    return "\n".join(lines) + "\n"


def task_manager(tasks: list[str], include_path: Optional[str], tasks_option: str, include_option: str):
    """lm-eval's TaskManager for these tasks (only the folder's when they are all there: indexing lm-eval's own
    thousands of tasks takes seconds); an unknown task is an error naming it and the options to fix it."""
    from lm_eval.tasks import TaskManager

    include = os.path.expanduser(include_path) if include_path else None
    manager = None
    if include:
        manager = TaskManager(include_path=include, include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"{tasks_option}: unknown task(s) {', '.join(unknown)} (add task YAML files with "
                         f"{include_option})")
    return manager


def evaluate_main(cfg: EvaluateConfig) -> int:
    import lm_eval

    from lit_mamba2.evals.harness import LitMamba2LM  # registers "lit_mamba2"

    lm = LitMamba2LM(cfg.checkpoint, dtype=cfg.dtype, device=cfg.device, max_length=cfg.max_length,
                     batch_size=cfg.batch_size, tokenizer=cfg.tokenizer)
    tasks = cfg.tasks or list(TASK_METRICS)
    manager = task_manager(tasks, cfg.include_path, "--tasks", "--include_path")
    limit = cfg.limit if cfg.limit is None or cfg.limit < 1 else int(cfg.limit)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=cfg.num_fewshot, limit=limit,
                                  batch_size=cfg.batch_size, task_manager=manager, log_samples=False,
                                  random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                  fewshot_random_seed=cfg.seed)
    paper = cfg.paper or matching_paper_model(lm.model.config)
    table = markdown_table(out["results"], paper)
    folder = Path(cfg.output_path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": cfg.checkpoint, "paper_model": paper, "results": out["results"],
              "n-shot": out.get("n-shot"), "versions": out.get("versions"), "config": out.get("config"),
              "configs": {task: {k: c.get(k) for k in TASK_FIELDS if c.get(k) is not None}
                          for task, c in (out.get("configs") or {}).items()},
              "paper": PAPER_RESULTS.get(paper) if paper else None}
    (folder / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (folder / "results.md").write_text(f"# {cfg.checkpoint}\n\n{table}")
    print(table, end="")
    print(f"wrote {folder / 'results.json'} and {folder / 'results.md'}")
    return 0
