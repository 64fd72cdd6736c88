"""`lit-mamba2 pretrain`: the recipe's dataclasses and the run they describe.

A recipe YAML maps 1:1 onto PretrainConfig: top-level keys model, tokenizer, data, optim, trainer, sample, resume.
The defaults below are the built-in default run (recipes/default.yaml writes them out): a small Mamba-2 trained
with the byte tokenizer on the Python standard library's own sources, on CPU in a few minutes.
"""

from __future__ import annotations

import copy
import re
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Optional, Sequence, TypedDict, Union

import torch
from typing_extensions import Unpack

from lit_mamba2.checkpoints import is_sharded_checkpoint, previous_path
from lit_mamba2.config import Mamba2Config
from lit_mamba2.evals.callback import EvalConfig
from lit_mamba2.hub import HubConfig
from lit_mamba2.launch import apply_launcher_env
from lit_mamba2.tokenizers import check_vocab_fits, load_tokenizer
from lit_mamba2.training.data import DataConfig, TokenStream, find_text_files
from lit_mamba2.training.module import OptimConfig

def _partial(cls) -> type:
    """The keys that may be given for the config dataclass `cls`, typed, none required, nested configs as their own
    partials: what jsonargparse checks a recipe's `model` section against, passing on only the keys given."""
    hints = typing.get_type_hints(cls)
    return TypedDict(f"{cls.__name__}Fields", {
        f.name: _partial(hints[f.name]) if is_dataclass(hints[f.name]) else hints[f.name] for f in fields(cls)},
        total=False)


ModelFields = _partial(Mamba2Config)


@dataclass(init=False)
class ModelArgs:
    """The model: a preset and the Mamba2Config fields given over it.

    Args:
        name: a preset (Mamba2Config.from_name); any Mamba2Config field given beside it overrides the preset's
            (ssm_cfg / attn_cfg set only the keys they name). null: the model is the fields alone (d_model, n_layer
            and vocab_size must be given).
    """

    name: Optional[str] = "mamba2-tiny"
    overrides: dict = field(default_factory=dict)  # the fields given, as given

    def __init__(self, name: Optional[str] = "mamba2-tiny", **given: Unpack[ModelFields]):
        self.name, self.overrides = name, dict(given)
        self.config  # noqa: B018 - a bad field fails here, while the recipe is read

    @property
    def config(self) -> Mamba2Config:
        if self.name is not None:
            return Mamba2Config.from_name(self.name, **self.overrides)
        absent = [k for k in ("d_model", "n_layer", "vocab_size") if k not in self.overrides]
        if absent:  # Mamba2Config's own defaults are mamba_ssm's 2.7B-sized model: never what a recipe means
            raise ValueError(f"model.name: null builds the model from its fields, but model.{absent[0]} is not "
                             f"given (give d_model, n_layer and vocab_size, or a preset name)")
        return Mamba2Config(**self.overrides)


# the object, not the postponed string (from __future__ import annotations): jsonargparse expands **given by it
ModelArgs.__init__.__annotations__["given"] = Unpack[ModelFields]


def build_model_config(args: ModelArgs) -> Mamba2Config:
    return args.config


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Union[int, str] = "auto"  # per node
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Optional[str] = None  # None: bf16-mixed on GPUs with bf16, else 32-true
    max_steps: int = 200  # optimizer steps
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0  # by the global norm of all gradients (every rank's shards)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    compile: Union[bool, str] = False  # torch.compile each block: true (inductor) or a backend's name
    val_every_n_steps: int = 100
    limit_val_batches: int = 10  # per rank and validation
    log_every_n_steps: int = 10
    save_every_n_steps: int = 100  # checkpoints/last.ckpt; also written at the end and on SIGTERM
    seed: int = 1234
    out_dir: str = "runs/pretrain"  # checkpoints/ and logs/ go here
    progress_bar: bool = True

    def __post_init__(self):
        for name in ("max_steps", "accumulate_grad_batches", "val_every_n_steps", "save_every_n_steps",
                     "log_every_n_steps", "num_nodes"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"trainer.{name} must be a positive integer, got {getattr(self, name)!r}")
        d = self.devices
        if not (isinstance(d, int) or d == "auto" or re.fullmatch(r"\s*-?\d+\s*|\s*\d+\s*(,\s*\d+\s*)*,?", d)):
            raise ValueError(f"trainer.devices must be a number of devices, 'auto', or device indices such as "
                             f"'0,1', got {d!r}")


@dataclass
class SampleConfig:
    """The sample generated from the final checkpoint (text data only)."""

    prompt: str = "def "
    max_new_tokens: int = 200  # 0: no sample
    temperature: float = 0.8
    top_k: Optional[int] = 20


@dataclass
class ParallelConfig:
    """The parallel layout under trainer.strategy: fsdp: dp_replicate × dp_shard × cp × tp = the world size; -1
    takes what is left. batch_size is per data-parallel rank (dp_replicate × dp_shard of them); cp ranks each hold a
    contiguous slice (seq_len / cp tokens) of the same rows."""

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1


@dataclass
class PretrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    tokenizer: str = "byte"  # "byte", or a Hugging Face tokenizer name or directory (unused for MQAR)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # lm-eval tasks scored every eval.every_n_steps
    hub: HubConfig = field(default_factory=HubConfig)  # push the trained model to the Hugging Face Hub
    resume: Union[bool, str] = False  # true: <out_dir>/checkpoints/last.ckpt; "auto": that if it exists; or a path


def recipe_dict(cfg: PretrainConfig) -> dict:
    """The resolved recipe as YAML data (what --config reads back); every checkpoint stores it."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    out = asdict(cfg)
    out["model"] = {"name": cfg.model.name, **cfg.model.overrides}
    return plain(out)


def extra_callbacks(cfg: PretrainConfig) -> list:
    """The recipe in every checkpoint; the eval: and hub: sections' callbacks when they are set."""
    from lit_mamba2.training.callbacks import PushToHub, RecipeInCheckpoint

    recipe = recipe_dict(cfg)
    out = [RecipeInCheckpoint(recipe)]
    evaluator = None
    if cfg.eval.tasks:
        if cfg.parallel.cp > 1:  # lm-eval's requests are whole rows; a context-parallel model takes slices
            raise ValueError("eval.tasks: scoring during training is not available with parallel.cp > 1; evaluate "
                             "a checkpoint instead (lit-mamba2 evaluate)")
        from lit_mamba2.evals.callback import EvalCallback

        evaluator = EvalCallback(cfg.eval)
        out.append(evaluator)
    if cfg.hub.repo_id:
        out.append(PushToHub(cfg.hub, recipe, evaluator))
    return out


def build_strategy(tc: TrainerConfig, parallel: ParallelConfig, seq_len: Optional[int] = None):
    """trainer.strategy: "fsdp" is our FSDP2 strategy over the parallel layout (Lightning's own "fsdp" is FSDP1);
    any other name is Lightning's. seq_len (data.seq_len): each row is cut into parallel.cp slices."""
    if tc.strategy == "fsdp":
        from lit_mamba2.parallel.strategy import FSDP2Strategy

        if seq_len is not None and parallel.cp > 1 and seq_len % parallel.cp:
            raise ValueError(f"data.seq_len = {seq_len} is not divisible by parallel.cp = {parallel.cp}: each rank "
                             "of a context-parallel group holds an equal slice of every row")
        return FSDP2Strategy(**asdict(parallel), seq_len=seq_len)
    others = {k: v for k, v in asdict(parallel).items() if k != "dp_shard" and v != 1}
    if others:
        raise ValueError(f"parallel.{next(iter(others))} = {next(iter(others.values()))} needs trainer.strategy: "
                         f"fsdp (got {tc.strategy!r})")
    return tc.strategy


def data_parallel_degree(strategy: str, parallel: ParallelConfig, world_size: int) -> int:
    """Ranks that read different samples: the layout's dp_replicate × dp_shard under fsdp, every rank otherwise."""
    if strategy == "fsdp":
        from lit_mamba2.parallel.dims import ParallelDims

        return ParallelDims.resolve(world_size, **asdict(parallel)).dp
    return world_size


def gradient_accumulation(data: DataConfig, accumulate_grad_batches: int, dp: int) -> int:
    """Batches per optimizer step on each rank: data.global_batch_size / (data.batch_size × dp) when the global
    batch is given (so that a recipe keeps it on any number of GPUs), else trainer.accumulate_grad_batches."""
    if data.global_batch_size is None:
        return accumulate_grad_batches
    if accumulate_grad_batches != 1:
        raise ValueError(f"give data.global_batch_size or trainer.accumulate_grad_batches, not both (got "
                         f"{data.global_batch_size} and {accumulate_grad_batches})")
    per_step = data.batch_size * dp
    if data.global_batch_size % per_step:
        raise ValueError(f"data.global_batch_size = {data.global_batch_size} is not a whole number of data.batch_size "
                         f"= {data.batch_size} × {dp} data-parallel ranks = {per_step} rows; choose a global batch "
                         f"that {per_step} divides, or another batch_size")
    return data.global_batch_size // per_step


def resolve_precision(precision: Optional[str], accelerator: str) -> str:
    if precision is not None:
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def resume_path(resume: Union[bool, str], out_dir: str) -> Optional[str]:
    """The checkpoint to resume from, or None for a fresh run; a fresh run refuses an out_dir that already holds a
    run's last.ckpt (it would be overwritten). "auto": resume when <out_dir> holds last.ckpt, else start."""
    last = Path(out_dir, "checkpoints", "last.ckpt")
    if resume == "auto":  # a job that may be requeued: continue if an earlier run of it saved, else start
        resume = last.exists() or is_sharded_checkpoint(previous_path(last))
    if resume is False or resume is None:
        if last.exists():
            raise ValueError(f"trainer.out_dir: {str(last)!r} exists from an earlier run; continue it with "
                             "--resume true, or start a new run in another --trainer.out_dir (or delete that one)")
        return None
    path = last if resume is True else Path(resume)
    if not path.exists() and is_sharded_checkpoint(previous_path(path)):
        path = previous_path(path)  # a crash between the two renames of a sharded save left it there
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    return str(path)



def check_resume_matches(path: str, model_config: Mamba2Config) -> None:
    """A resumed run must build the model its checkpoint holds: compare the stored model config field by field."""
    try:
        if is_sharded_checkpoint(path):  # its state_dict lives in the shards
            ckpt = {**torch.load(Path(path, "meta.pt"), map_location="cpu", weights_only=True), "state_dict": None}
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways
        raise ValueError(f"resume: cannot read {path!r} as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"resume: {path!r} is not a checkpoint written by lit-mamba2 pretrain (it has no "
                         "'state_dict' and 'model_config'); to start from published weights, fine-tune instead")
    stored, wanted = Mamba2Config.from_dict(dict(ckpt["model_config"])).to_dict(), model_config.to_dict()
    differ = [k for k in wanted if stored.get(k) != wanted[k]]
    if differ:
        k = differ[0]
        more = f" (and {len(differ) - 1} more fields)" if differ[1:] else ""
        raise ValueError(f"resume: {path!r} holds a different model: model.{k} is {stored.get(k)!r} there and "
                         f"{wanted[k]!r} in this recipe{more}")


def check_data_paths(data: DataConfig) -> None:
    """Fail before any process group or model exists when the data is not there."""
    if data.kind == "text":
        find_text_files(data.paths, data.include, data.exclude, data.max_bytes)
    elif data.kind == "tokens":
        for paths in [[b.path] for b in data.blend] or [data.paths]:
            TokenStream(paths)
        if data.val_paths:
            TokenStream(data.val_paths)


def default_loggers(out_dir: str) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(out_dir, name="logs")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        import tensorboard  # noqa: F401  (TensorBoardLogger also works with tensorboardX; we only add it if present)

        loggers.append(TensorBoardLogger(out_dir, name="tb"))
    except ImportError:
        pass
    return loggers


def checkpoint_dir(tc: TrainerConfig) -> Path:
    return Path(tc.out_dir, "checkpoints")


def build_trainer(tc: TrainerConfig, parallel: ParallelConfig, data, callbacks: Sequence = ()):
    """The Lightning Trainer of a training verb (pretrain, finetune): checkpoints/last.ckpt every
    save_every_n_steps and on SIGTERM, validation every val_every_n_steps, throughput, lr and loss logs; extra
    `callbacks` join these; the gradient accumulation from `data` (batch_size, global_batch_size) and the layout.
    Returns it and the callback that remembers the step of the last validation."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

    from lit_mamba2.training.callbacks import CheckpointOnSigterm, LastValidationStep, TokenThroughput

    batches = tc.max_steps * tc.accumulate_grad_batches
    ckpt_dir = checkpoint_dir(tc)
    validated = LastValidationStep()
    trainer = L.Trainer(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
        strategy=build_strategy(tc, parallel, data.seq_len),
        precision=resolve_precision(tc.precision, tc.accelerator), max_steps=tc.max_steps,
        accumulate_grad_batches=tc.accumulate_grad_batches, gradient_clip_val=tc.gradient_clip_val,
        val_check_interval=min(tc.val_every_n_steps * tc.accumulate_grad_batches, batches),
        check_val_every_n_epoch=None, limit_val_batches=tc.limit_val_batches, num_sanity_val_steps=0,
        log_every_n_steps=tc.log_every_n_steps, use_distributed_sampler=False,
        enable_progress_bar=tc.progress_bar, enable_model_summary=tc.progress_bar,
        logger=default_loggers(tc.out_dir), default_root_dir=tc.out_dir,
        # no version counter: last.ckpt is replaced, never joined by last-v1.ckpt (a resumed run writes it again)
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=tc.save_every_n_steps, save_top_k=0,
                                   save_last=True, enable_version_counter=False),
                   CheckpointOnSigterm(ckpt_dir / "last.ckpt"), TokenThroughput(), validated,
                   LearningRateMonitor(logging_interval="step"),
                   *([TQDMProgressBar()] if tc.progress_bar else []), *callbacks],
    )
    # the world size is known once the Trainer has resolved devices and nodes: the accumulation follows from it
    dp = data_parallel_degree(tc.strategy, parallel, trainer.world_size)
    accumulate = gradient_accumulation(data, tc.accumulate_grad_batches, dp)
    trainer.accumulate_grad_batches = accumulate
    trainer.val_check_interval = min(tc.val_every_n_steps, tc.max_steps) * accumulate
    return trainer, validated


def describe_batch(trainer, tc: TrainerConfig, parallel: ParallelConfig, data) -> str:
    dp, accumulate = data_parallel_degree(tc.strategy, parallel, trainer.world_size), trainer.accumulate_grad_batches
    return (f"global batch {data.batch_size * dp * accumulate} rows ({data.batch_size} × {dp} data-parallel ranks × "
            f"{accumulate} accumulated)")


def fit(trainer, module, datamodule, tc: TrainerConfig, ckpt_path: Optional[str], validated) -> tuple[dict, float]:
    """trainer.fit, then last.ckpt if the periodic saves missed the last steps, and a validation of the final
    weights if fit did not end with one. Returns the final metrics and the training time (s)."""
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    train_time = time.perf_counter() - start
    if trainer.global_step % tc.save_every_n_steps != 0:  # the periodic saves missed the last steps
        trainer.save_checkpoint(checkpoint_dir(tc) / "last.ckpt")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if validated.step != trainer.global_step and datamodule.val_set is not None:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # (it replaces callback_metrics)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    return metrics, train_time


def pretrain(cfg: PretrainConfig, callbacks: Sequence = ()) -> dict:
    """Train as the config says (extra Lightning `callbacks` join the built-in ones); returns a summary: final
    losses, time, checkpoint path, sample."""
    import lightning as L

    from lit_mamba2.training.data import LMDataModule, unigram_entropy
    from lit_mamba2.training.module import LanguageModel

    cfg = copy.deepcopy(cfg)
    # Lightning cannot see that LMDataModule's sampler restarts at the restored batch count by itself
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    tc = apply_launcher_env(cfg.trainer)
    ckpt_path = resume_path(cfg.resume, tc.out_dir)
    L.seed_everything(tc.seed, verbose=False)

    model_config = build_model_config(cfg.model)
    if cfg.parallel.tp > 1:
        from lit_mamba2.parallel.tensor import check_tensor_parallel

        check_tensor_parallel(model_config, cfg.parallel.tp)  # before any process group exists
    if ckpt_path is not None:
        check_resume_matches(ckpt_path, model_config)
    tokenizer = None
    if cfg.data.kind == "mqar":
        if cfg.data.mqar.vocab_size > model_config.vocab_size:
            raise ValueError(f"model.vocab_size = {model_config.vocab_size} is smaller than data.mqar.vocab_size = "
                             f"{cfg.data.mqar.vocab_size}")
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer.eos_id is None:
            raise ValueError(f"tokenizer {cfg.tokenizer!r} has no eos token; documents need one to mark their end")
        check_vocab_fits(tokenizer, model_config.vocab_size)
    check_data_paths(cfg.data)

    datamodule = LMDataModule(cfg.data, tokenizer, tc.max_steps, tc.accumulate_grad_batches,
                              vocab_size=model_config.vocab_size)
    module = LanguageModel(model_config.to_dict(), asdict(cfg.optim), tokenizer, accuracy=cfg.data.kind == "mqar",
                           activation_checkpointing=tc.activation_checkpointing, compile=tc.compile)
    ckpt_dir = checkpoint_dir(tc)
    trainer, validated = build_trainer(tc, cfg.parallel, cfg.data, [*extra_callbacks(cfg), *callbacks])
    datamodule.accumulate = trainer.accumulate_grad_batches
    if trainer.is_global_zero:
        print(f"model: d_model={model_config.d_model} n_layer={model_config.n_layer} "
              f"vocab={model_config.padded_vocab_size}, tokenizer: {tokenizer!r}, data: {cfg.data.kind}, "
              f"world size {trainer.world_size}, precision {trainer.precision}, {describe_batch(trainer, tc, cfg.parallel, cfg.data)}",
              flush=True)
    metrics, train_time = fit(trainer, module, datamodule, tc, ckpt_path, validated)

    summary = {"step": trainer.global_step, "train_loss": metrics.get("train/loss"),
               "val_loss": metrics.get("val/loss"), "val_ppl": metrics.get("val/ppl"), "val_acc": metrics.get("val/acc"),
               "train_time_s": train_time, "checkpoint": str(ckpt_dir / "last.ckpt"),
               "params": _num_parameters(model_config)}
    if cfg.data.kind != "mqar":
        summary["val_unigram_entropy"] = unigram_entropy(datamodule.val_tokens()) if datamodule.val_set else None
    if trainer.is_global_zero:
        if cfg.sample.max_new_tokens > 0 and tokenizer is not None:
            summary["sample"] = sample_from_checkpoint(summary["checkpoint"], cfg.sample)
        print_summary(summary)
    return summary


def _num_parameters(config: Mamba2Config) -> int:
    """The whole model's parameters (a rank's own may be a tensor-parallel slice): counted on the meta device."""
    from lit_mamba2.model import Mamba2LMHeadModel

    with torch.device("meta"):
        return Mamba2LMHeadModel(config).num_parameters()


def sample_from_checkpoint(path: str, sc: SampleConfig) -> str:
    """Load the checkpoint alone (model config and tokenizer are inside) and continue sc.prompt."""
    from lit_mamba2.checkpoints import load
    from lit_mamba2.generation import generate
    from lit_mamba2.model import Mamba2LMHeadModel

    loaded = load(Mamba2LMHeadModel, path)
    tokenizer = loaded.tokenizer
    prompt = torch.tensor([tokenizer.encode(sc.prompt)], dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    out = generate(loaded.model, prompt, sc.max_new_tokens, temperature=sc.temperature, top_k=sc.top_k,
                   stop_tokens=(tokenizer.eos_id,), generator=gen)
    return tokenizer.decode(out[0].tolist())


def print_summary(s: dict) -> None:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    print(f"\nfinished at step {s['step']} in {s['train_time_s']:.1f} s ({s['params']:,} parameters)")
    print(f"train loss {fmt(s['train_loss'])} | val loss {fmt(s['val_loss'])} nats/token | val ppl {fmt(s['val_ppl'])}"
          + (f" | val acc {fmt(s['val_acc'])}" if s.get("val_acc") is not None else ""))
    if s.get("val_unigram_entropy") is not None:
        print(f"unigram entropy of the validation tokens: {s['val_unigram_entropy']:.4f} nats "
              f"(the loss of a model that ignores context)")
    print(f"checkpoint: {s['checkpoint']}")
    if "sample" in s:
        print("sample:\n" + "-" * 60 + f"\n{s['sample']}\n" + "-" * 60, flush=True)
