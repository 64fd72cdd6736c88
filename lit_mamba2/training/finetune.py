"""`lit-mamba2 finetune`: a trained checkpoint on instruction data, full or LoRA, the best checkpoint exported.

A recipe YAML maps 1:1 onto FinetuneConfig: checkpoint, tokenizer, data, method, lora, optim, trainer, parallel,
export, resume. The run shares pretrain's Trainer (checkpoints/last.ckpt, SIGTERM, resume, validation, logs) and
LanguageModel (the loss, val/loss and val/ppl over response tokens); it adds the starting weights, LoRA, the
checkpoint with the lowest validation loss (checkpoints/best.ckpt) and its export for transformers or mamba_ssm.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, Union

from lit_mamba2.launch import apply_launcher_env
from lit_mamba2.lora import LoRAConfig
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.training.finetune_data import InstructionDataConfig
from lit_mamba2.training.module import LanguageModel, OptimConfig
from lit_mamba2.training.pretrain import (ParallelConfig, TrainerConfig, build_trainer, check_resume_matches,
                                          checkpoint_dir, fit, resume_path)


@dataclass
class ExportConfig:
    """What the best checkpoint (lowest validation loss; the last one without validation) is written as at the end.

    Args:
        format: hf (transformers' Mamba2ForCausalLM; pure Mamba-2 models) or mamba_ssm; LoRA adapters merged in
        dtype: the exported weights' dtype (default float32)
        peft: with method lora, also write the adapters in PEFT's format (<out_dir>/best-peft) where PEFT takes
            them: on transformers' Mamba-2, in_proj only
    """

    format: Literal["hf", "mamba_ssm"] = "hf"
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    peft: bool = True


def _finetune_optim() -> OptimConfig:
    return OptimConfig(lr=3e-5, weight_decay=0.0, warmup_steps=20, min_lr_ratio=0.1)


def _finetune_trainer() -> TrainerConfig:
    return TrainerConfig(max_steps=1000, val_every_n_steps=100, save_every_n_steps=100, out_dir="runs/finetune")


@dataclass
class FinetuneConfig:
    """The options of `lit-mamba2 finetune`.

    Args:
        checkpoint: the starting weights: a Hub id (state-spaces/mamba2-130m), a mamba_ssm or transformers folder,
            or a lit-mamba2 training checkpoint (.ckpt file or sharded folder)
        tokenizer: default the checkpoint's own; or 'byte', a Hugging Face name or folder
        method: full (every weight trains) or lora (adapters only; the rest frozen)
        resume: true: <out_dir>/checkpoints/last.ckpt; or a checkpoint path
    """

    checkpoint: str
    tokenizer: Optional[str] = None
    data: InstructionDataConfig = field(default_factory=InstructionDataConfig)
    method: Literal["full", "lora"] = "full"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=_finetune_optim)
    trainer: TrainerConfig = field(default_factory=_finetune_trainer)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    resume: Union[bool, str] = False


class FinetuneModel(LanguageModel):
    """LanguageModel starting from given weights (`base()` returns the model), with LoRA adapters when `lora` is
    given; a checkpoint holds the adapters' settings beside them (checkpoints.load merges them)."""

    token_weighted_gradients = True  # prompts are masked: ranks count different numbers of response tokens

    def __init__(self, model_config: dict, optim: dict, tokenizer, base: Callable[[], Mamba2LMHeadModel],
                 lora: Optional[dict] = None, **training):
        super().__init__(model_config, optim, tokenizer, **training)
        self._base, self.lora = base, lora

    def initial_model(self) -> Mamba2LMHeadModel:
        from lit_mamba2.lora import apply_lora

        model, self._base = self._base().train(), None
        if self.lora is not None:
            apply_lora(model, LoRAConfig(**self.lora))
        return model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lora is not None:
            checkpoint["lora"] = dict(self.lora)


def finetune(cfg: FinetuneConfig, callbacks: Sequence = ()) -> dict:
    """Fine-tune as the config says; returns a summary: losses, the best checkpoint, the exported folders."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_mamba2.checkpoints import CheckpointError, config_to_hf, load
    from lit_mamba2.training.finetune_data import InstructionDataModule, read_records

    cfg = copy.deepcopy(cfg)
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    tc = apply_launcher_env(cfg.trainer)
    ckpt_path = resume_path(cfg.resume, tc.out_dir)
    L.seed_everything(tc.seed, verbose=False)
    if not cfg.data.train:
        raise ValueError("data.train: no files given (JSON Lines or JSON files of Alpaca or chat records)")
    for p in [*cfg.data.train, *cfg.data.val]:  # a malformed record fails before any weight is read
        read_records(p)

    loaded = load(Mamba2LMHeadModel, cfg.checkpoint, tokenizer=cfg.tokenizer)
    model_config, tokenizer = loaded.model.config, loaded.tokenizer
    if tokenizer is None:
        raise ValueError(f"checkpoint {cfg.checkpoint!r} has no tokenizer; name one with --tokenizer")
    if cfg.export.format == "hf":
        try:
            config_to_hf(model_config, loaded.model.lm_head.weight.dtype)
        except CheckpointError as e:
            raise ValueError(f"export.format: {e}") from None
    if ckpt_path is not None:
        check_resume_matches(ckpt_path, model_config)
    lora = asdict(cfg.lora) if cfg.method == "lora" else None

    datamodule = InstructionDataModule(cfg.data, tokenizer, tc.max_steps, tc.accumulate_grad_batches,
                                       vocab_size=model_config.vocab_size, progress=tc.progress_bar)
    base = loaded.model
    module = FinetuneModel(model_config.to_dict(), asdict(cfg.optim), tokenizer, lambda: base, lora,
                           activation_checkpointing=tc.activation_checkpointing, compile=tc.compile)
    ckpt_dir = checkpoint_dir(tc)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                           save_weights_only=True, auto_insert_metric_name=False, enable_version_counter=False)
    trainer, validated = build_trainer(tc, cfg.parallel, cfg.data, [best, *callbacks])
    datamodule.accumulate = trainer.accumulate_grad_batches
    if trainer.is_global_zero:
        print(f"fine-tuning {cfg.checkpoint} ({cfg.method}): d_model={model_config.d_model} "
              f"n_layer={model_config.n_layer} vocab={model_config.padded_vocab_size}, tokenizer: {tokenizer!r}, "
              f"world size {trainer.world_size}, precision {trainer.precision}", flush=True)
    metrics, train_time = fit(trainer, module, datamodule, tc, ckpt_path, validated)
    # a validation after fit (of the final weights) is not seen by the callback: keep them if they are the best
    val_loss = metrics.get("val/loss")
    if val_loss is not None and (best.best_model_score is None or val_loss < float(best.best_model_score)):
        best.best_model_path = str(ckpt_dir / "best.ckpt")
        trainer.save_checkpoint(best.best_model_path, weights_only=True)
        best.best_model_score = val_loss
    chosen = best.best_model_path or str(ckpt_dir / "last.ckpt")

    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    summary = {"step": trainer.global_step, "train_loss": metrics.get("train/loss"), "val_loss": val_loss,
               "val_ppl": metrics.get("val/ppl"), "train_time_s": train_time,
               "best_val_loss": None if best.best_model_score is None else float(best.best_model_score),
               "best": chosen, "checkpoint": str(ckpt_dir / "last.ckpt"), "trainable_params": trainable,
               "params": sum(p.numel() for p in module.model.parameters())}
    if trainer.is_global_zero:
        summary.update(export(chosen, Path(tc.out_dir), cfg))
        print_summary(summary)
    return summary


def export(path: str, out_dir: Path, cfg: FinetuneConfig) -> dict:
    """The checkpoint at `path` (adapters merged) as `<out_dir>/best` in cfg.export.format, with its tokenizer;
    with LoRA, its adapters in PEFT's format as `<out_dir>/best-peft` where PEFT takes them."""
    from lit_mamba2.checkpoints import load, read_training_checkpoint, save
    from lit_mamba2.lora import adapters_of, peft_unsupported_reason, save_peft_adapter

    loaded = load(Mamba2LMHeadModel, path, dtype=cfg.export.dtype)
    out = {"export": str(save(loaded.model, out_dir / "best", cfg.export.format, tokenizer=loaded.tokenizer))}
    if cfg.method == "lora" and cfg.export.peft:
        config, sd, _ = read_training_checkpoint(path, merge_adapters=False)
        adapters = adapters_of(sd)
        reason = peft_unsupported_reason(config, list(adapters))
        if reason is None:
            dtype = loaded.model.lm_head.weight.dtype
            adapters = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in adapters.items()}
            out["peft"] = str(save_peft_adapter(out_dir / "best-peft", adapters, cfg.lora.rank, cfg.lora.alpha,
                                                base_model=cfg.checkpoint, dropout=cfg.lora.dropout))
        else:
            out["peft_skipped"] = reason
    return out


def print_summary(s: dict) -> None:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    print(f"\nfinished at step {s['step']} in {s['train_time_s']:.1f} s ({s['trainable_params']:,} of "
          f"{s['params']:,} parameters trained)")
    print(f"train loss {fmt(s['train_loss'])} | val loss {fmt(s['val_loss'])} nats/token (responses) | "
          f"val ppl {fmt(s['val_ppl'])} | best val loss {fmt(s['best_val_loss'])}")
    print(f"best checkpoint: {s['best']}\nexported ({s.get('export')}): load it with from_pretrained, generate, "
          "evaluate")
    if "peft" in s:
        print(f"PEFT adapter: {s['peft']} (on transformers' Mamba2ForCausalLM of the base weights)")
    elif "peft_skipped" in s:
        print(f"no PEFT adapter: {s['peft_skipped']}")
