"""The LightningModule for causal-LM training of a Mamba2LMHeadModel (a checkpoint it writes loads back with
`lit_mamba2.checkpoints.load`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Union

import lightning as L
import numpy as np
import torch
import torchmetrics

from lit_mamba2.config import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.tokenizers import Tokenizer, tokenizer_from_state
from lit_mamba2.training.callbacks import count_batches_in_steps
from lit_mamba2.training.data import IGNORE_INDEX


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1  # not applied to A_log, D, dt_bias, norm weights and biases
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    schedule: str = "cosine"  # "cosine": warmup then cosine to min_lr; "wsd": warmup, stable, decay; "constant"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # final lr / peak lr
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if not (self.weight_decay >= 0 and self.eps > 0 and self.warmup_steps >= 0):
            raise ValueError(f"optim: weight_decay and warmup_steps must be >= 0 and eps > 0, got "
                             f"{self.weight_decay}, {self.warmup_steps}, {self.eps}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"optim.schedule must be 'cosine', 'wsd' or 'constant', got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction must lie in (0, 1], got {self.decay_fraction}")
        self.betas = tuple(self.betas)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total_steps - int(cfg.decay_fraction * total_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1 - (1 - lo) * progress


# Parameters that weight decay would pull towards values they must not approach (A = -exp(A_log) -> -1, D -> 0,
# dt -> softplus(0)): mamba_ssm's exceptions, by name, so that the rule survives FSDP2 / DTensor wrapping.
NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def decays(name: str, p: torch.Tensor) -> bool:
    """The weight decay rule: matrices decay (embeddings, linear and conv weights); vectors (norm weights,
    biases) and the SSM's A_log, D and dt_bias do not."""
    return p.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups, with and without weight decay, by `decays`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rng_states() -> dict:
    """torch's, CUDA's, numpy's and Python's generators, as tensors and plain values (a checkpoint read with
    weights_only=True holds no numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    out = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss], "python": [version, list(state), gauss_next]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class TokenWeightedMeanLoss(torchmetrics.Metric):
    """Mean loss per counted token over all batches and ranks; `perplexity()` is its exp."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, loss_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        self.loss_sum += loss_sum.detach().double()
        self.tokens += tokens.detach()

    def compute(self) -> torch.Tensor:
        return (self.loss_sum / self.tokens).float()


def resolve_model_config(model_config: Union[Mamba2Config, str, dict, None]) -> Mamba2Config:
    """A Mamba2Config from itself, a preset name or a config dict."""
    if isinstance(model_config, Mamba2Config):
        return model_config
    if isinstance(model_config, str):
        return Mamba2Config.from_name(model_config)
    if isinstance(model_config, dict):
        return Mamba2Config.from_dict(model_config)
    raise TypeError(f"model_config must be a Mamba2Config, a preset name or a dict (or give pretrained), got "
                    f"{type(model_config).__name__}")


BATCH_KEYS = "input_ids (int64 rows × seq_len), labels (int64, input_ids' shape, -100 for positions not counted), " \
             "optional seq_idx (int32, the document of each position) and positions (int, each position's index)"


def check_batch(batch) -> None:
    """A batch is a dict of tensors: input_ids and labels, of one (rows, seq_len) shape, optional seq_idx and
    positions of that shape; shapes and dtypes only, so that nothing waits on the device."""
    if not isinstance(batch, dict):
        raise TypeError(f"a batch must be a dict with keys {BATCH_KEYS}; got a {type(batch).__name__}")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise KeyError(f"batch has no {key!r} (keys: {', '.join(map(str, batch))}); a batch holds {BATCH_KEYS}")
    shape = batch["input_ids"].shape if isinstance(batch["input_ids"], torch.Tensor) else None
    for key in ("input_ids", "labels", "seq_idx", "positions"):
        value = batch.get(key)
        if value is None and key in ("seq_idx", "positions"):
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"batch[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"batch[{key!r}] must hold integers (token ids / indices), got {value.dtype}")
        if value.ndim != 2 or value.shape != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)}; it must be (rows, seq_len) like "
                             f"input_ids {tuple(shape)}")


class LanguageModel(L.LightningModule):
    """Next-token training of a Mamba2LMHeadModel. The model is built in `configure_model`, so that a sharding
    strategy can build it on its own devices; the config and the tokenizer travel inside every checkpoint."""

    # the gradient of the mean over all the step's counted tokens when ranks count different numbers of tokens
    # (fine-tuning: prompts masked); pretraining counts every position
    token_weighted_gradients = False

    def __init__(self, model_config: Union[Mamba2Config, str, dict, None] = None, optim: Optional[dict] = None,
                 tokenizer: Optional[Tokenizer] = None, accuracy: bool = False,
                 activation_checkpointing: bool = False, compile: Union[bool, str] = False,
                 pretrained: Optional[str] = None):
        """model_config: a Mamba2Config, a preset name ("mamba2-130m"), a config dict (what checkpoints store) or,
        with `pretrained`, None for the checkpoint's own. pretrained: a Hub repo id, a folder or a .ckpt to start
        from (read by `lit_mamba2.checkpoints.load`; its tokenizer too when none is given)."""
        super().__init__()
        self._pretrained = None
        if pretrained is not None:
            from lit_mamba2.checkpoints import load

            loaded = load(Mamba2LMHeadModel, pretrained)
            self._pretrained = loaded.model
            if model_config is None:
                model_config = loaded.model.config
            tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
        self.config = resolve_model_config(model_config)
        if self._pretrained is not None and self._pretrained.config.to_dict() != self.config.to_dict():
            raise ValueError(f"model_config differs from the config of pretrained={pretrained!r}: leave it out")
        self.save_hyperparameters({"model_config": self.config.to_dict(), "optim": optim or {}, "accuracy": accuracy})
        self.optim = OptimConfig(**(optim or {}))
        self.tokenizer = tokenizer
        self.accuracy = accuracy  # also log argmax accuracy on the labelled positions (MQAR recall)
        self.activation_checkpointing, self.compile_blocks = activation_checkpointing, compile
        self.model: Optional[Mamba2LMHeadModel] = None
        self.cp_rank, self.cp = 0, 1  # context parallelism: this rank holds slice cp_rank of cp of every row
        self._window, self._window_batches = None, 0  # train/loss over the micro-batches of one optimizer step
        self.val_loss = TokenWeightedMeanLoss()
        self.val_acc = torchmetrics.MeanMetric()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from lit_mamba2.parallel import ShardingPolicy, build_model, parallelize

        mesh = getattr(self._trainer.strategy, "parallel_mesh", None) if self._trainer is not None else None
        policy = None
        if mesh is not None:  # trainer.strategy: fsdp
            precision = self.trainer.precision
            if precision not in ("bf16-mixed", "32-true", "32", "64-true"):
                raise ValueError(f"trainer.precision {precision!r} under trainer.strategy fsdp: use bf16-mixed (float32 "
                                 "sharded parameters and optimizer state, computed in bf16) or 32-true")
            policy = ShardingPolicy(param_dtype=torch.bfloat16 if precision == "bf16-mixed" else None)
        fsdp_mesh = None if mesh is None else mesh.fsdp
        # tensor parallel: each part split over the tp ranks before FSDP2 shards it over the data-parallel mesh
        tp_mesh = mesh.world["tp"] if mesh is not None and mesh.dims.tp > 1 else None
        given = self.initial_model()
        if given is None:  # from the seed: every layout starts from one process's weights (sharded: part by part)
            self.model = build_model(self.config, fsdp_mesh, policy, self.activation_checkpointing,
                                     self.compile_blocks, tp_mesh)
        else:
            self.model = parallelize(given, fsdp_mesh, policy, self.activation_checkpointing, self.compile_blocks,
                                     tp_mesh)
        if mesh is not None and mesh.dims.cp > 1:  # each rank holds a contiguous slice of every row
            from lit_mamba2.parallel import apply_context_parallel

            cp = mesh.world["cp"]
            apply_context_parallel(self.model, cp.get_group())
            self.cp_rank, self.cp = cp.get_local_rank(), cp.size()

    def initial_model(self) -> Optional[Mamba2LMHeadModel]:
        """The whole model to start from, or None: drawn from the seed; `pretrained`'s weights when given (a
        subclass starts from other weights: finetune)."""
        model, self._pretrained = self._pretrained, None
        return None if model is None else model.train()

    def forward(self, input_ids, seq_idx=None):
        return self.model(input_ids, seq_idx=seq_idx)

    def _local(self, batch: dict) -> dict:
        """This rank's part of the rows: under context parallelism its contiguous slice, with the positions
        computed on the whole rows; else the rows as they are."""
        if self.cp == 1:
            return batch
        from lit_mamba2.parallel import slice_batch

        return slice_batch(batch, self.cp_rank, self.cp)

    def _loss_sum(self, batch: dict) -> torch.Tensor:
        return self.model.loss(batch["input_ids"], batch["labels"], seq_idx=batch.get("seq_idx"),
                               positions=batch.get("positions"), ignore_index=IGNORE_INDEX, reduction="sum")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        check_batch(batch)
        rows_counted = (batch["labels"] != IGNORE_INDEX).sum()  # this data-parallel rank's rows, whole
        batch = self._local(batch)
        counted = (batch["labels"] != IGNORE_INDEX).sum()  # this rank's part of them
        loss_sum = self._loss_sum(batch)
        # the gradients are averaged over dp_shard × cp ranks (FSDP; DDP over the data-parallel ranks): the factor
        # cp makes the cp slices' sums add up to their rows' loss
        if self.token_weighted_gradients:
            # the mean over every counted token of the step's micro-batch, when ranks count different numbers
            ranks, total = self._data_parallel_sum(rows_counted)
            loss = loss_sum * (ranks * self.cp) / total.clamp(min=1)
        else:  # every position counts, on every rank alike: the mean over this rank's rows is that already
            loss = loss_sum * self.cp / rows_counted.clamp(min=1)
        # logged: the token-weighted mean over every rank's tokens and the micro-batches of an accumulation window
        # (what one process with the whole global batch logs), at the window's last
        stats = torch.stack([loss_sum.detach().double(), counted.double()])
        self._window = stats if self._window is None else self._window + stats
        self._window_batches += 1
        if self._window_batches == self.trainer.accumulate_grad_batches:
            window, self._window, self._window_batches = self._window, None, 0
            if self.trainer.world_size > 1:
                window = self.trainer.strategy.reduce(window, reduce_op="sum")
            self.log("train/loss", (window[0] / window[1].clamp(min=1)).float(), prog_bar=True)
        return loss

    def _data_parallel_sum(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(data-parallel ranks, the sum of x over them)."""
        if self.trainer.world_size == 1:
            return 1, x
        mesh = getattr(self.trainer.strategy, "parallel_mesh", None)
        if mesh is None:
            return self.trainer.world_size, self.trainer.strategy.reduce(x, reduce_op="sum")
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, group=mesh.dp.get_group())
        return mesh.dp.size(), x

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        check_batch(batch)
        batch = self._local(batch)
        labels = batch["labels"]
        counted = labels != IGNORE_INDEX
        self.val_loss.update(self._loss_sum(batch), counted.sum())
        if self.accuracy:
            pred = self.model(batch["input_ids"], seq_idx=batch.get("seq_idx"),
                              positions=batch.get("positions")).argmax(-1)
            self.val_acc.update((pred == labels)[counted].float())

    def on_validation_epoch_end(self) -> None:
        mean = self.val_loss.compute()
        self.log_dict({"val/loss": mean, "val/ppl": mean.exp()}, prog_bar=True, sync_dist=False)
        self.val_loss.reset()
        if self.accuracy:
            self.log("val/acc", self.val_acc.compute(), prog_bar=True)
            self.val_acc.reset()

    def on_before_optimizer_step(self, optimizer) -> None:
        if getattr(self.model, "tensor_parallel", None) is not None:
            from lit_mamba2.parallel.tensor import sync_replicated_grads

            sync_replicated_grads(self.model)  # before clipping, which reads them

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # under tensor parallelism each rank holds different pieces of the gradients: Lightning's clip (torch's
        # clip_grad_norm_ over this rank's parameters) would take a different norm on each; one global norm instead
        if getattr(self.model, "tensor_parallel", None) is None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"gradient clipping by {gradient_clip_algorithm!r} under tensor parallelism: only 'norm'")
        from lit_mamba2.parallel.tensor import clip_grad_norm_

        clip_grad_norm_(self.model, gradient_clip_val)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(param_groups(self.model, self.optim.weight_decay), lr=self.optim.lr,
                                betas=self.optim.betas, eps=self.optim.eps)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, self.optim))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["model_config"] = self.config.to_dict()
        # the random generators (rank 0's, in a sharded checkpoint's meta.pt): every rank draws alike, from the seed
        checkpoint["rng_states"] = rng_states()
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and "loops" in checkpoint:  # (before Lightning restores its loops from it)
            count_batches_in_steps(checkpoint, self.trainer.accumulate_grad_batches)
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        if self.tokenizer is None and "tokenizer" in checkpoint:
            self.tokenizer = tokenizer_from_state(checkpoint["tokenizer"])

