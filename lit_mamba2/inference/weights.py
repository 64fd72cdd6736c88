"""An explicit view of a model's weights for the decode engine: plain tensors and sizes, no modules.

The views share storage with the model's parameters (no copy); build them after the model has its final device
and dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from lit_mamba2.model import Attention, Mamba2LMHeadModel, Mamba2Mixer, RMSNorm

Tensor = torch.Tensor


def _weight(module: nn.Module, name: str) -> Tensor:
    """A linear layer's weight, which the decode engine multiplies by itself: right only for a layer whose forward
    is nn.Linear's. A layer that adds to it (a LoRA adapter, lit_mamba2.lora) is refused, not silently skipped."""
    if type(module).forward is not nn.Linear.forward:
        raise ValueError(f"{name} is a {type(module).__name__}, whose output is not x @ weight.T + bias: the decode "
                         "engine reads the weights directly; merge adapters into the weights first "
                         "(lit_mamba2.lora.merge_lora(model))")
    return module.weight


@dataclass(frozen=True)
class Norm:
    weight: Tensor
    eps: float


@dataclass(frozen=True)
class MixerWeights:
    """A Mamba-2 mixer: in_proj's output is [z0, x0, z, xBC, dt] with sizes (d_mlp, d_mlp, d_ssm, conv_dim, nheads)."""

    in_proj: Tensor
    in_proj_bias: Optional[Tensor]
    conv: Tensor  # (conv_dim, width)
    conv_bias: Optional[Tensor]
    dt_bias: Tensor
    A_log: Tensor
    D: Tensor  # (nheads,) or (nheads, headdim)
    norm: Optional[Norm]  # the gated RMSNorm over norm_groups groups of d_ssm channels
    norm_groups: int
    norm_before_gate: bool
    out_proj: Tensor
    out_proj_bias: Optional[Tensor]
    d_mlp: int
    d_ssm: int
    conv_dim: int
    nheads: int
    headdim: int
    ngroups: int
    d_state: int
    dt_limit: tuple

    @property
    def norm_commutes(self) -> bool:
        """A gated norm of one group with the gate before the norm, no channels beside the SSM, and an out_proj
        without bias: the norm's per-row scale commutes with out_proj, so it can be folded (step.py)."""
        return (self.norm is not None and self.norm_groups == 1 and not self.norm_before_gate and self.d_mlp == 0
                and self.out_proj_bias is None)

    @classmethod
    def of(cls, m: Mamba2Mixer, name: str = "mixer") -> "MixerWeights":
        n = m.norm
        return cls(_weight(m.in_proj, f"{name}.in_proj"), m.in_proj.bias, m.conv1d.weight[:, 0, :], m.conv1d.bias,
                   m.dt_bias, m.A_log, m.D.view(m.nheads, m.headdim) if m.D_has_hdim else m.D,
                   None if n is None else Norm(n.weight, n.eps), 1 if n is None else m.d_ssm // n.group_size,
                   False if n is None else n.norm_before_gate, _weight(m.out_proj, f"{name}.out_proj"),
                   m.out_proj.bias, m.d_mlp, m.d_ssm, m.conv_dim, m.nheads, m.headdim, m.ngroups, m.d_state,
                   tuple(m.dt_limit))


@dataclass(frozen=True)
class AttentionWeights:
    in_proj: Tensor  # [q, k, v, mlp up|gate]
    in_proj_bias: Optional[Tensor]
    conv: Optional[Tensor]  # (qkv_dim, width) or None
    conv_bias: Optional[Tensor]
    out_proj: Tensor
    out_proj_bias: Optional[Tensor]
    num_heads: int
    num_heads_kv: int
    head_dim: int
    qkv_dim: int
    mlp_dim: int
    rotary_dim: int
    rotary_base: float
    scale: Optional[float]

    @classmethod
    def of(cls, a: Attention, name: str = "mixer") -> "AttentionWeights":
        conv = a.conv1d if a.d_conv > 0 else None
        return cls(_weight(a.in_proj, f"{name}.in_proj"), a.in_proj.bias,
                   None if conv is None else conv.weight[:, 0, :], None if conv is None else conv.bias,
                   _weight(a.out_proj, f"{name}.out_proj"), a.out_proj.bias, a.num_heads, a.num_heads_kv,
                   a.head_dim, a.qkv_dim, a.mlp_dim, a.rotary_dim, a.rotary_base, a.softmax_scale)


@dataclass(frozen=True)
class LayerWeights:
    norm: Norm
    mixer: Union[MixerWeights, AttentionWeights]
    norm2: Optional[Norm] = None  # with the gated MLP (fc1 -> [y, gate], fc2)
    fc1: Optional[Tensor] = None
    fc2: Optional[Tensor] = None


@dataclass(frozen=True)
class ModelWeights:
    embedding: Tensor
    layers: tuple
    norm_f: Norm
    lm_head: Tensor
    residual_in_fp32: bool
    vocab_size: int

    @classmethod
    def of(cls, model: Mamba2LMHeadModel) -> "ModelWeights":
        def norm(n: RMSNorm):
            return Norm(n.weight, n.eps)

        layers = []
        for i, layer in enumerate(model.backbone.layers):
            m, name = layer.mixer, f"backbone.layers.{i}"
            mixer = (MixerWeights.of(m, f"{name}.mixer") if isinstance(m, Mamba2Mixer)
                     else AttentionWeights.of(m, f"{name}.mixer"))
            mlp = () if layer.mlp is None else (norm(layer.norm2), _weight(layer.mlp.fc1, f"{name}.mlp.fc1"),
                                                _weight(layer.mlp.fc2, f"{name}.mlp.fc2"))
            layers.append(LayerWeights(norm(layer.norm), mixer, *mlp))
        bb = model.backbone
        return cls(bb.embedding.weight, tuple(layers), norm(bb.norm_f), _weight(model.lm_head, "lm_head"),
                   model.config.residual_in_fp32, model.config.vocab_size)
