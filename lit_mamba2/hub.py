"""Publishing to the Hugging Face Hub: `lit-mamba2 push`, and what the push callback of training calls.

`push(cfg)` exports a checkpoint (folder, Hub id or training .ckpt) with `checkpoints.load` / `save` into a folder
(weights, config.json, tokenizer files) and writes beside them
- README.md, the model card: metadata (base model, datasets, license, tags, library, and the evaluation results as
  the card's `model-index`, through huggingface_hub's ModelCard / EvalResult) and a body (the model, how to load
  it, the training recipe, the results beside the paper's);
- `.eval_results/<task>.yaml`, the Hub's newer results format (huggingface_hub's EvalResultEntry), for each task
  whose lm-eval dataset is a Hub dataset (a local task has no Hub benchmark to point to);
then uploads the folder in one commit: the repo is created if absent (private if asked), the branch (`revision`)
too, and weight files left from an earlier push (of either format) are deleted by the same commit.

The token is HF_TOKEN, else the stored login (`hf auth login`); HF_ENDPOINT, read at each push, names another Hub
endpoint. Results come from the results.json that `lit-mamba2 evaluate` writes.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from lit_mamba2.checkpoints import TOKENIZER_FILES, CheckpointError, load, save

# what a push replaces (deleted unless the new folder holds them): the weight files of either format and their
# indexes, the tokenizer's files (a byte-tokenizer model has none, and must not be read with an earlier one's), and
# the earlier results
REPLACED_PATTERNS = ["*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", *TOKENIZER_FILES,
                     ".eval_results/*"]
# a folder at least this large goes through upload_large_folder where huggingface_hub has it (resumable, several
# commits); huggingface_hub 1.x+'s upload_folder is itself resumable and multi-commit with hf_xet
LARGE_FOLDER_BYTES = 50 * 2**30
PAPER = "https://arxiv.org/abs/2405.21060"


def _as_list(value: Union[str, list[str], None], name: str) -> list[str]:
    """A repeatable option: each value, or a comma-separated list."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    out = [v.strip() for s in values for v in str(s).split(",") if v.strip()]
    for v in out:
        if not re.fullmatch(r"[\w.\-/:+]+", v):
            raise ValueError(f"--{name}: {v!r} is not a Hub id or tag")
    return out


@dataclass
class CardConfig:
    """What the model card says besides what the checkpoint and the results hold.

    Args:
        base_model: Hub id of the model this one was fine-tuned from
        datasets: Hub ids of the datasets it was trained on (a list, or comma-separated)
        license: the license's Hub identifier (apache-2.0, mit, other, ...)
        tags: tags besides mamba2, lit-mamba2 and text-generation (a list, or comma-separated)
    """

    base_model: Optional[str] = None
    datasets: Union[str, list[str], None] = None
    license: str = "apache-2.0"
    tags: Union[str, list[str], None] = None

    def __post_init__(self):
        self.datasets = _as_list(self.datasets, "card.datasets")
        self.tags = _as_list(self.tags, "card.tags")
        if not re.fullmatch(r"[a-z0-9.\-]+", self.license):
            raise ValueError(f"--card.license: {self.license!r} is not a Hub license identifier (e.g. apache-2.0)")


def check_repo_id(repo_id: str, what: str = "--repo_id") -> str:
    if not re.fullmatch(r"([\w\-.]+/)?[\w\-.]+", repo_id or "") or ".." in repo_id or repo_id.endswith(".git"):
        raise ValueError(f"{what}: {repo_id!r} is not a Hub repo id ('user/name')")
    return repo_id


@dataclass
class PushConfig:
    """The options of `lit-mamba2 push`.

    Args:
        checkpoint: checkpoint folder, Hub repo id or training .ckpt
        repo_id: the Hub model repo to push to, 'user/name' ('name' alone: your own namespace)
        private: create the repo private (an existing repo keeps its visibility)
        revision: the branch to push to (created from main when absent); default main
        format: 'hf' (transformers' Mamba2ForCausalLM, pure Mamba-2 models) or 'mamba_ssm' (any model)
        results: a results.json written by `lit-mamba2 evaluate`: its scores go into the card and its metadata
        card: what the model card says (base model, datasets, license, tags)
        dtype: dtype of the weights written (default float32)
        tokenizer: tokenizer to ship, a name, folder or 'byte' (default: the checkpoint's own)
        recipe: a training recipe YAML to show in the card (default: the recipe stored in a training .ckpt)
        commit_message: default 'Upload <model> with lit-mamba2'
        folder: export into this folder and keep it (new or empty; default: a temporary folder)
        dry_run: export and write the card, upload nothing
    """

    checkpoint: str
    repo_id: str
    private: bool = False
    revision: Optional[str] = None
    format: Literal["hf", "mamba_ssm"] = "hf"
    results: Optional[str] = None
    card: CardConfig = field(default_factory=CardConfig)
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    tokenizer: Optional[str] = None
    recipe: Optional[str] = None
    commit_message: Optional[str] = None
    folder: Optional[str] = None
    dry_run: bool = False

    def __post_init__(self):
        check_repo_id(self.repo_id)
        if self.results is not None and not Path(self.results).expanduser().is_file():
            raise FileNotFoundError(f"--results {self.results}: no such file (the results.json of lit-mamba2 "
                                    "evaluate)")
        if self.recipe is not None and not Path(self.recipe).expanduser().is_file():
            raise FileNotFoundError(f"--recipe {self.recipe}: no such file")
        if self.folder is not None:
            out = Path(self.folder).expanduser()
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise ValueError(f"--folder {self.folder}: exists and is not an empty folder")


@dataclass
class HubConfig:
    """Publishing from training (the `hub:` section of a recipe): the trained model is pushed at the end of the
    run, and with `checkpoints_branch` at every checkpoint too (training.callbacks.PushToHub).

    Args:
        repo_id: the Hub model repo, 'user/name'; null (the default): no push
        private: create the repo private (an existing repo keeps its visibility)
        revision: the branch the final model goes to (default main)
        format: 'hf' (transformers' Mamba2ForCausalLM, pure Mamba-2 models) or 'mamba_ssm' (any model)
        checkpoints_branch: also push the model at every checkpoint (trainer.save_every_n_steps) to this branch,
            one commit per checkpoint, uploaded in the background while training goes on
        card: what the model card says (base model, datasets, license, tags)
    """

    repo_id: Optional[str] = None
    private: bool = False
    revision: Optional[str] = None
    format: Literal["hf", "mamba_ssm"] = "hf"
    checkpoints_branch: Optional[str] = None
    card: CardConfig = field(default_factory=CardConfig)

    def __post_init__(self):
        if self.repo_id is not None:
            check_repo_id(self.repo_id, "hub.repo_id")
        if self.checkpoints_branch is not None and self.repo_id is None:
            raise ValueError("hub.checkpoints_branch needs hub.repo_id")


# ---------------------------------------------------------------------------------------------------------------
# evaluation results: lm-eval's results.json -> scores
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """One metric of one lm-eval task, as the card reports it."""

    task: str
    metric: str
    value: float
    stderr: Optional[float]
    dataset: Optional[str]  # the task's dataset (lm-eval's dataset_path): a Hub id or a loader name ("json")
    dataset_config: Optional[str]
    split: Optional[str]
    num_fewshot: Optional[int]
    headline: bool  # the task's main metric (the paper's, or the first one reported)


def read_results(path: Union[str, os.PathLike]) -> dict:
    """The record `lit-mamba2 evaluate` writes (results.json); lm-eval's own output (simple_evaluate's dict, or
    its results_*.json) is accepted too."""
    path = Path(path).expanduser()
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as a results JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("results"), dict):
        raise ValueError(f"{path}: no 'results' mapping (expected the results.json of lit-mamba2 evaluate)")
    return record


def scores(record: dict) -> list[Score]:
    """Every task's reported metrics: the paper's metric (and LAMBADA's perplexity) for the paper's tasks, every
    metric for others."""
    from lit_mamba2.evals.run import _metrics_of, _value

    configs = record.get("configs") or {}
    nshot = record.get("n-shot") or {}
    out = []
    for task, values in record["results"].items():
        if not isinstance(values, dict):
            continue
        cfg = configs.get(task) or {}
        for i, metric in enumerate(_metrics_of(task, values)):
            v, se = _value(values, metric)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            se = None if se is None or (isinstance(se, float) and math.isnan(se)) else float(se)
            shots = nshot.get(task, cfg.get("num_fewshot"))
            out.append(Score(task, metric, float(v), se, cfg.get("dataset_path"), cfg.get("dataset_name"),
                             cfg.get("test_split") or cfg.get("validation_split"),
                             int(shots) if isinstance(shots, (int, float)) else None, i == 0))
    return out


def _is_hub_dataset(name: Optional[str]) -> bool:
    return bool(name) and re.fullmatch(r"[\w\-.]+/[\w\-.]+", name) is not None and not os.path.exists(name)


def eval_result_files(found: list[Score], date: Optional[str] = None) -> dict[str, str]:
    """`.eval_results/<task>.yaml` for each task whose dataset is a Hub dataset: its main metric as one
    EvalResultEntry (the format names one value per benchmark task; the metric and setup go in `notes`)."""
    import warnings

    import yaml

    try:
        from huggingface_hub import EvalResultEntry, eval_result_entries_to_yaml
    except ImportError:
        warnings.warn("this huggingface_hub has no EvalResultEntry: no .eval_results/ files are written (the card's "
                      "model-index holds the results); pip install -U huggingface_hub")
        return {}

    try:
        import lm_eval

        harness = f"lm-evaluation-harness {lm_eval.__version__}"
    except ImportError:
        harness = "lm-evaluation-harness"
    files = {}
    for s in found:
        if not s.headline or not _is_hub_dataset(s.dataset):
            continue
        shots = f", {s.num_fewshot}-shot" if s.num_fewshot is not None else ""
        entry = EvalResultEntry(dataset_id=s.dataset, task_id=s.task, value=s.value, date=date,
                                notes=f"{s.metric}{shots}, {harness}, model lit_mamba2")
        files[f".eval_results/{s.task}.yaml"] = yaml.safe_dump(eval_result_entries_to_yaml([entry]), sort_keys=False)
    return files


# ---------------------------------------------------------------------------------------------------------------
# the model card
# ---------------------------------------------------------------------------------------------------------------
def _loading_snippet(repo_id: str, fmt: str, byte_tokenizer: bool) -> str:
    tok = ', tokenizer="byte"' if byte_tokenizer else ""
    lines = ["```python", "from lit_mamba2 import Mamba2LMHeadModel", "from lit_mamba2.checkpoints import load",
             f'loaded = load(Mamba2LMHeadModel, "{repo_id}"{tok})   # .model, .tokenizer', "```"]
    if fmt == "hf":
        lines += ["", "or with transformers:", "", "```python", "from transformers import Mamba2ForCausalLM",
                  f'model = Mamba2ForCausalLM.from_pretrained("{repo_id}")', "```"]
    else:
        lines += ["", "or with mamba_ssm:", "", "```python", "from mamba_ssm.models.mixer_seq_simple import "
                  "MambaLMHeadModel", f'model = MambaLMHeadModel.from_pretrained("{repo_id}")', "```"]
    return "\n".join(lines)


def model_card(repo_id: str, config, fmt: str, card: CardConfig, *, tokenizer=None, results: Optional[dict] = None,
               recipe: Optional[str] = None, trained_steps: Optional[int] = None, n_params: Optional[int] = None):
    """The model card (huggingface_hub.ModelCard): metadata with the evaluation results as model-index, and a
    body describing the model, how to load it, its training recipe and its results."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from lit_mamba2.evals.run import markdown_table, matching_paper_model
    from lit_mamba2.tokenizers import HFTokenizer

    found = scores(results) if results else []
    name = repo_id.split("/")[-1]
    evals = [EvalResult(task_type="text-generation", task_name="Text Generation",
                        dataset_type=s.dataset if _is_hub_dataset(s.dataset) else s.task, dataset_name=s.task,
                        dataset_config=s.dataset_config, dataset_split=s.split,
                        dataset_args={"num_few_shot": s.num_fewshot} if s.num_fewshot is not None else None,
                        metric_type=s.metric, metric_name=s.metric, metric_value=s.value,
                        source_name="lm-evaluation-harness (lit-mamba2 evaluate)",
                        source_url="https://github.com/EleutherAI/lm-evaluation-harness") for s in found]
    kind = "hybrid Mamba-2/attention" if config.attn_layer_idx else "Mamba-2"
    tags = ["mamba2", "lit-mamba2", "text-generation", *(["hybrid"] if config.attn_layer_idx else [])]
    tags += [t for t in card.tags if t not in tags]
    data = ModelCardData(
        model_name=name, license=card.license, base_model=card.base_model, datasets=card.datasets or None,
        library_name="transformers" if fmt == "hf" else None, pipeline_tag="text-generation", tags=tags,
        eval_results=evals or None)
    byte = tokenizer is not None and not isinstance(tokenizer, HFTokenizer)
    if tokenizer is None:
        tok_line = "No tokenizer is included."
    elif byte:
        tok_line = ("The tokenizer is lit-mamba2's byte tokenizer (token id = UTF-8 byte, end of document = byte 0); "
                    "it has no files: load with `tokenizer=\"byte\"`.")
    else:
        tok_line = f"The tokenizer's files are included (vocabulary {tokenizer.vocab_size})."
    size = f"{n_params / 1e6:.1f}M parameters, " if n_params else ""
    shape = (f"{size}d_model {config.d_model}, {config.n_layer} layers, d_state {config.ssm.d_state}, vocabulary "
             f"{config.vocab_size}" + (f", attention at layers {config.attn_layer_idx}" if config.attn_layer_idx
                                       else ""))
    parts = [f"# {name}", "",
             f"A {kind} language model ([Transformers are SSMs]({PAPER}), Dao & Gu 2024): {shape}. Weights in "
             f"{'transformers (Mamba2ForCausalLM)' if fmt == 'hf' else 'mamba_ssm (MambaLMHeadModel)'} format, "
             f"written by lit-mamba2."
             + (f" Fine-tuned from [{card.base_model}](https://huggingface.co/{card.base_model})."
                if card.base_model else ""), "", tok_line, "", "## Usage", "", _loading_snippet(repo_id, fmt, byte)]
    if recipe or trained_steps is not None or card.datasets:
        parts += ["", "## Training", ""]
        if trained_steps is not None:
            parts += [f"Trained with `lit-mamba2 pretrain` for {trained_steps} optimizer steps."]
        if card.datasets:
            parts += ["Data: " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in card.datasets) + "."]
        if recipe:
            parts += ["", "The recipe (`lit-mamba2 pretrain --config recipe.yaml`):", "", "```yaml", recipe.rstrip(),
                      "```"]
    if results:
        paper = results.get("paper_model") or matching_paper_model(config)
        shots = {t: n for t, n in (results.get("n-shot") or {}).items() if n}
        shots = "; few-shot examples: " + ", ".join(f"{t} {n}" for t, n in shots.items()) if shots else ", zero-shot"
        parts += ["", "## Evaluation", "",
                  "With [lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness) through "
                  f"`lit-mamba2 evaluate`{shots} (accuracies in percent)"
                  + (f", beside the paper's numbers for {paper}" if paper else "") + ":", "",
                  markdown_table(results["results"], paper).rstrip()]
        if results.get("limit"):
            parts += ["", f"(On the first {results['limit']} documents of each task, while training.)"]
    parts += ["", "## License", "", f"{card.license}", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


# ---------------------------------------------------------------------------------------------------------------
# export: a checkpoint -> a folder ready to upload
# ---------------------------------------------------------------------------------------------------------------
def training_record(path: Union[str, os.PathLike]) -> dict:
    """What a training .ckpt tells besides its weights: the recipe it was trained with and its step."""
    from lit_mamba2.checkpoints import _is_training_checkpoint, is_sharded_checkpoint

    if not _is_training_checkpoint(path):
        return {}
    path = Path(path)
    try:
        if is_sharded_checkpoint(path):
            ckpt = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - load() has read it already; this is only the card's extras
        raise CheckpointError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    return {"recipe": ckpt.get("recipe"), "global_step": ckpt.get("global_step")}


def recipe_yaml(recipe: Union[dict, str, None]) -> Optional[str]:
    import yaml

    if recipe is None or isinstance(recipe, str):
        return recipe
    return yaml.safe_dump(recipe, sort_keys=False)


def write_folder(folder: Union[str, os.PathLike], model, tokenizer, repo_id: str, fmt: str, card: CardConfig,
                 results: Optional[dict] = None, recipe: Union[dict, str, None] = None,
                 trained_steps: Optional[int] = None) -> Path:
    """Weights, config, tokenizer (checkpoints.save), README.md (the card) and .eval_results/ in `folder`."""
    import warnings

    folder = Path(folder)
    with warnings.catch_warnings():  # (the byte tokenizer has no files: the card says how to load it)
        warnings.filterwarnings("ignore", message="the tokenizer is the built-in byte tokenizer")
        save(model, folder, fmt, tokenizer=tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    card_ = model_card(repo_id, model.config, fmt, card, tokenizer=tokenizer, results=results,
                       recipe=recipe_yaml(recipe), trained_steps=trained_steps, n_params=n_params)
    card_.save(folder / "README.md")
    shutil.rmtree(folder / ".eval_results", ignore_errors=True)
    date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    for name, text in (eval_result_files(scores(results), date) if results else {}).items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# upload
# ---------------------------------------------------------------------------------------------------------------
def hub_api():
    """An HfApi on HF_ENDPOINT as set now (huggingface_hub reads it once, at import), with HF_TOKEN or the stored
    login; no token is an error naming both."""
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise ValueError("no Hugging Face token: set HF_TOKEN, or log in once with `hf auth login`")
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def upload(folder: Union[str, os.PathLike], repo_id: str, *, private: bool = False, revision: Optional[str] = None,
           commit_message: str = "Upload with lit-mamba2", api=None, run_as_future: bool = False):
    """Create the repo (and branch) if absent, then upload `folder` as one commit that also deletes the weight,
    tokenizer and results files the folder does not hold. Returns the commit info (a Future of it with run_as_future) and the repo id."""
    api = api or hub_api()
    if "/" not in repo_id:
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    folder = Path(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size >= LARGE_FOLDER_BYTES and hasattr(api, "upload_large_folder") and not run_as_future:
        # resumable, in several commits; it cannot delete files, so stale ones are deleted first
        stale = [f for f in api.list_repo_files(repo_id, revision=revision)
                 if _matches(f, REPLACED_PATTERNS) and not (folder / f).exists()]
        if stale:
            from huggingface_hub import CommitOperationDelete

            api.create_commit(repo_id, [CommitOperationDelete(f) for f in stale], revision=revision,
                              commit_message="Delete weight files of an earlier push")
        api.upload_large_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision)
        return None, repo_id
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message,
                             delete_patterns=REPLACED_PATTERNS, run_as_future=run_as_future)
    return info, repo_id


def _matches(path: str, patterns: list[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(path, p) for p in patterns)


def push(cfg: PushConfig) -> str:
    """`lit-mamba2 push`: export, write the card, upload; returns the repo's URL (or the folder for a dry run)."""
    from lit_mamba2.model import Mamba2LMHeadModel

    results = read_results(cfg.results) if cfg.results else None
    api = None if cfg.dry_run else hub_api()  # no token: fail before the (possibly long) export
    loaded = load(Mamba2LMHeadModel, cfg.checkpoint, dtype=cfg.dtype, tokenizer=cfg.tokenizer)
    record = training_record(cfg.checkpoint)
    recipe = Path(cfg.recipe).expanduser().read_text() if cfg.recipe else record.get("recipe")
    keep = cfg.folder is not None
    folder = Path(cfg.folder).expanduser() if keep else Path(tempfile.mkdtemp(prefix="lit-mamba2-push-"))
    try:
        write_folder(folder, loaded.model, loaded.tokenizer, cfg.repo_id, cfg.format, cfg.card, results, recipe,
                     record.get("global_step"))
        if cfg.dry_run:
            return str(folder)
        message = cfg.commit_message or f"Upload {Path(str(cfg.checkpoint)).name} with lit-mamba2"
        _, repo_id = upload(folder, cfg.repo_id, private=cfg.private, revision=cfg.revision,
                            commit_message=message, api=api)
        endpoint = api.endpoint.rstrip("/")
        return f"{endpoint}/{repo_id}" + (f"/tree/{cfg.revision}" if cfg.revision not in (None, "main") else "")
    finally:
        if not keep and not cfg.dry_run:
            shutil.rmtree(folder, ignore_errors=True)


def push_main(cfg: PushConfig) -> int:
    where = push(cfg)
    print(f"wrote {where} (dry run: nothing uploaded)" if cfg.dry_run else f"pushed to {where}")
    return 0

