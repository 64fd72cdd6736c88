"""An explicit view of a model's weights for the decode engine: plain tensors and sizes, no modules.

The views share storage with the model's parameters (no copy); build them after the model has its final device
and dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from lit_mamba2.model import Attention, Mamba2LMHeadModel, Mamba2Mixer, RMSNorm

Tensor = torch.Tensor


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
    def of(cls, m: Mamba2Mixer) -> "MixerWeights":
        n = m.norm
        return cls(m.in_proj.weight, m.in_proj.bias, m.conv1d.weight[:, 0, :], m.conv1d.bias, m.dt_bias, m.A_log,
                   m.D.view(m.nheads, m.headdim) if m.D_has_hdim else m.D,
                   None if n is None else Norm(n.weight, n.eps), 1 if n is None else m.d_ssm // n.group_size,
                   False if n is None else n.norm_before_gate, m.out_proj.weight, m.out_proj.bias, m.d_mlp, m.d_ssm,
                   m.conv_dim, m.nheads, m.headdim, m.ngroups, m.d_state, tuple(m.dt_limit))


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
    def of(cls, a: Attention) -> "AttentionWeights":
        conv = a.conv1d if a.d_conv > 0 else None
        return cls(a.in_proj.weight, a.in_proj.bias, None if conv is None else conv.weight[:, 0, :],
                   None if conv is None else conv.bias, a.out_proj.weight, a.out_proj.bias, a.num_heads,
                   a.num_heads_kv, a.head_dim, a.qkv_dim, a.mlp_dim, a.rotary_dim, a.rotary_base, a.softmax_scale)


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
        for layer in model.backbone.layers:
            m = layer.mixer
            mixer = MixerWeights.of(m) if isinstance(m, Mamba2Mixer) else AttentionWeights.of(m)
            mlp = () if layer.mlp is None else (norm(layer.norm2), layer.mlp.fc1.weight, layer.mlp.fc2.weight)
            layers.append(LayerWeights(norm(layer.norm), mixer, *mlp))
        bb = model.backbone
        return cls(bb.embedding.weight, tuple(layers), norm(bb.norm_f), model.lm_head.weight,
                   model.config.residual_in_fp32, model.config.vocab_size)
