"""LoRA (Hu et al. 2021): low-rank adapters on a model's linear layers, applied from outside the model.

`apply_lora(model, rank, alpha, targets)` replaces each targeted nn.Linear inside the blocks by a `LoRALinear`
(the same weight and bias Parameters, plus `lora_A` (rank, in) and `lora_B` (out, rank); y = x Wᵀ + b +
(alpha / rank) · dropout(x) Aᵀ Bᵀ) and freezes every other parameter. Targets are the linear layers' own names:
`in_proj` (the Mamba-2 mixer's fused projection, one adapter over all of z, x, B, C, dt; and an attention layer's
fused qkv[+mlp] projection), `out_proj` (both mixers), `fc1`, `fc2` (the gated MLP). The model calls these layers
as modules on every path (chunked forward, loss, the one-token step), so they all see the adapter; the decode
engine (lit_mamba2.inference) reads weights directly and refuses an unmerged adapter.

`merge_lora(model)` folds the adapters into the weights (W += scaling · B A) and puts plain nn.Linear layers back:
what an exported model holds. `merge_state_dict` is the same on a state dict (a LoRA training checkpoint's).
`save_peft_adapter` writes adapters in PEFT's format for transformers' Mamba2ForCausalLM, which PEFT accepts on
`in_proj` only (0.22 refuses out_proj and conv1d on Mamba models): `peft_unsupported_reason` says why a set of
adapters cannot be written that way.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

SUFFIXES = ("lora_A", "lora_B")
TARGETS = ("in_proj", "out_proj", "fc1", "fc2")
PEFT_TARGETS = ("in_proj",)  # what PEFT accepts on transformers' Mamba2ForCausalLM


@dataclass
class LoRAConfig:
    """LoRA adapters (method: lora).

    Args:
        rank: the adapters' rank r
        alpha: the update is scaled by alpha / rank
        dropout: dropout on the adapters' input while training
        targets: names of the linear layers that get an adapter: in_proj and out_proj (Mamba-2 mixers and attention
            layers), fc1 and fc2 (gated MLPs); every other parameter is frozen
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["in_proj", "out_proj", "fc1", "fc2"])

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must lie in [0, 1), got {self.dropout!r}")
        self.targets = list(self.targets)
        if not self.targets:
            raise ValueError(f"lora.targets is empty; name some of {', '.join(TARGETS)}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"lora.targets: {unknown[0]!r} is not a linear layer that takes an adapter; choose from "
                             f"{', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update beside its weight. `weight` and `bias` are the wrapped layer's own
    Parameters (so the state dict keeps their names: a base checkpoint's keys still match), `lora_A` starts as
    nn.Linear's (PEFT's) Kaiming init and `lora_B` at zero, so that the wrapped model starts as the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **like))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def reset_parameters(self):  # (the model's init_weights resets the layer: the adapter starts again too)
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.reset_adapter()

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_A),
                                                               self.lora_B) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight includes the update."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(merged_weight(self.weight, self.lora_A, self.lora_B, self.scaling))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            out.bias.requires_grad_(self.bias.requires_grad)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling · B A, computed in float32 (at least) and returned in W's dtype."""
    w = weight.detach()
    hi = torch.float64 if w.dtype == torch.float64 else torch.float32
    return (w.to(hi) + scaling * (B.detach().to(hi) @ A.detach().to(hi))).to(w.dtype)


def _targets(model: nn.Module, targets) -> list[str]:
    """Names of the nn.Linear layers inside the blocks whose own name is a target (the LM head and the embedding
    are never adapted: the fused loss reads the head's weight directly)."""
    return [name for name, m in model.named_modules()
            if name.startswith("backbone.layers.") and type(m) is nn.Linear and name.rsplit(".", 1)[-1] in targets]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every targeted linear layer of `model` in a LoRALinear, in place, and freeze every other parameter.
    Returns the wrapped layers' names. A target that names no layer of this model is an error."""
    names = _targets(model, config.targets)
    found = {n.rsplit(".", 1)[-1] for n in names}
    absent = [t for t in config.targets if t not in found]
    if absent:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                       if n.startswith("backbone.layers.") and isinstance(m, nn.Linear)})
        raise ValueError(f"lora.targets: this model has no {absent[0]!r} layer (its linear layers: "
                         f"{', '.join(have)})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, attr = _parent(model, name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config.rank, config.alpha, config.dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight and put a plain nn.Linear back, in place; returns the model."""
    for name, layer in lora_layers(model).items():
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer.merged())
    return model


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in SUFFIXES


def merge_state_dict(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict with adapters (`<layer>.lora_A`, `<layer>.lora_B` beside `<layer>.weight`) as the merged
    model's: each adapter folded into its weight, the adapter entries gone."""
    out = {k: v for k, v in state_dict.items() if not is_adapter_key(k)}
    layers = {k.rsplit(".", 1)[0] for k in state_dict if is_adapter_key(k)}
    for layer in sorted(layers):
        keys = [f"{layer}.weight", f"{layer}.lora_A", f"{layer}.lora_B"]
        absent = [k for k in keys if k not in state_dict]
        if absent:
            raise ValueError(f"adapter of {layer!r}: {absent[0]!r} is missing from the state dict")
        out[keys[0]] = merged_weight(*(state_dict[k] for k in keys), scaling)
    return out


# ---------------------------------------------------------------------------------------------------------------
# PEFT's format (transformers' Mamba2ForCausalLM)
# ---------------------------------------------------------------------------------------------------------------
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def peft_unsupported_reason(model_config, layer_names) -> Optional[str]:
    """Why adapters on `layer_names` of a model with `model_config` cannot be written for PEFT on transformers'
    Mamba2ForCausalLM (None: they can)."""
    from lit_mamba2.checkpoints import CheckpointError, config_to_hf

    try:
        config_to_hf(model_config, torch.float32)
    except CheckpointError as e:
        return str(e).split(":", 1)[-1].split(". Save", 1)[0].strip()
    others = sorted({n.rsplit(".", 1)[-1] for n in layer_names} - set(PEFT_TARGETS))
    if others:
        return (f"PEFT accepts LoRA on {', '.join(PEFT_TARGETS)} only on transformers' Mamba-2 (it refuses "
                f"{', '.join(others)}); these adapters are in the merged model")
    return None


def save_peft_adapter(folder: str | os.PathLike, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      rank: int, alpha: float, base_model: Optional[str] = None, dropout: float = 0.0) -> Path:
    """Write `adapters` ({layer name: (lora_A, lora_B)}, our layer names = transformers' for Mamba-2 in_proj) as
    PEFT's LoRA adapter folder: adapter_config.json + adapter_model.safetensors, which
    `peft.PeftModel.from_pretrained(Mamba2ForCausalLM.from_pretrained(base), folder)` loads. `base_model` is
    recorded as base_model_name_or_path (a transformers-format folder or Hub id of the same base weights)."""
    from lit_mamba2.checkpoints import _save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({n.rsplit(".", 1)[-1] for n in adapters})
    tensors = {}
    for name, (A, B) in adapters.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().to("cpu").contiguous().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().to("cpu").contiguous().clone()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "init_lora_weights": True, "inference_mode": True}
    _save_safetensors(tensors, folder / PEFT_WEIGHTS_NAME, {"format": "pt"})
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def adapters_of(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (lora_A, lora_B)} of a state dict with adapters."""
    layers = sorted({k.rsplit(".", 1)[0] for k in state_dict if is_adapter_key(k)})
    return {layer: (state_dict[f"{layer}.lora_A"], state_dict[f"{layer}.lora_B"]) for layer in layers}
