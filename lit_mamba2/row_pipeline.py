"""The decode step of a pure Mamba-2 model as a pipeline of row groups (kernels/decode_pipeline.py has the why and
the kernel): which group runs which stage of which layer in each launch."""

from __future__ import annotations

from typing import Optional

import torch

from .model import Mamba2LMHeadModel, Mamba2Mixer, Mamba2State

STAGES = 3  # I (norm + in_proj + conv), S (state update), O (out_proj + residual): one launch each


def unsupported_reason(model: Mamba2LMHeadModel) -> Optional[str]:
    """Why the pipelined step cannot run this model (None when it can)."""
    for i, layer in enumerate(model.backbone.layers):
        m = layer.mixer
        if not isinstance(m, Mamba2Mixer):
            return f"layer {i} is an attention layer (the pipeline runs pure Mamba-2 models)"
        if layer.mlp is not None:
            return f"layer {i} has an MLP"
        if not m.norm_commutes():
            return (f"layer {i}: the gated norm cannot fold (it needs one norm group with the gate before the "
                    f"norm, no channels beside the SSM and no out_proj bias)")
    return None


class RowPipeline:
    """Launch t runs, for each row group g, stage (t - g) % 3 of layer (t - g) // 3: with three groups every launch
    has one group in each stage, so one group's states stream while the other two groups' products run.
    `step` writes through fixed buffers and launches only, so a CUDA graph can capture it."""

    def __init__(self, model: Mamba2LMHeadModel, states: list, slot: torch.Tensor, groups: int = 3):
        from lit_mamba2.kernels.decode_pipeline import MixerWeights, PipelineBuffers, prepare_stage

        reason = unsupported_reason(model)
        if reason is None and not all(isinstance(st, Mamba2State) and st.ring for st in states):
            reason = "the conv states must be rings (Decoder(ring_conv=True))"
        if reason is not None:
            raise ValueError(f"row pipeline: {reason}")
        if not 1 <= groups <= STAGES:
            raise ValueError(f"row pipeline: groups must be 1..{STAGES}, got {groups}")
        self.model = model
        layers = model.backbone.layers
        m0 = layers[0].mixer
        batch = states[0].ssm.shape[0]
        groups = min(groups, batch)
        weight = model.lm_head.weight
        self.residual_dtype = torch.float32 if model.config.residual_in_fp32 else weight.dtype
        self.bufs = PipelineBuffers.allocate(batch, m0.d_model, m0.d_ssm, m0.in_proj.out_features, m0.nheads,
                                             m0.headdim, m0.d_state, weight.dtype, self.residual_dtype, weight.device)
        mixer_weights = []
        for i, layer in enumerate(layers):
            m = layer.mixer
            after = layers[i + 1].norm if i + 1 < len(layers) else model.backbone.norm_f
            mixer_weights.append(MixerWeights(
                m.in_proj.weight, m.in_proj.bias, layer.norm.eps, m.conv1d.weight[:, 0, :], m.conv1d.bias, m.A_log,
                m.D.view(m.nheads, m.headdim) if m.cfg["D_has_hdim"] else m.D, m.dt_bias, m.dt_limit, m.norm.weight,
                m.norm.eps, m.out_proj.weight, m.ngroups, after.weight))
        base, extra = divmod(batch, groups)
        sizes = [base + (g < extra) for g in range(groups)]
        starts = [sum(sizes[:g]) for g in range(groups)]
        block_m = max(16, 1 << (max(sizes) - 1).bit_length())
        first, st = mixer_weights[0], states[0]
        self.stages = []
        for t in range(STAGES * len(layers) + groups - 1):
            roles = [(0, 0, first, st.conv, slot), (0, 0, first, st.ssm), (0, 0, first)]  # I, S, O: idle
            for g in range(groups):
                k = t - g
                if 0 <= k < STAGES * len(layers):
                    i, stage = divmod(k, STAGES)
                    rows = (starts[g], sizes[g], mixer_weights[i])
                    roles[stage] = rows + ((states[i].conv, slot), (states[i].ssm,), ())[stage]
            self.stages.append(prepare_stage(self.bufs, m0.nheads, m0.headdim, m0.d_state, block_m, roles[0],
                                             roles[2], roles[1]))
        self.first_norm = layers[0].norm.weight

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (batch,) -> logits (batch, padded_vocab); the states advance in place."""
        from lit_mamba2.kernels.decode_pipeline import embed_rows, launch_stage
        from lit_mamba2.kernels.state_update import add_rmsnorm

        bufs = self.bufs
        embed_rows(token, self.model.backbone.embedding.weight, self.first_norm, bufs)
        for stage in self.stages:
            launch_stage(stage)
        norm = self.model.backbone.norm_f
        normed = add_rmsnorm(bufs.residual, None, norm.weight, norm.eps, self.residual_dtype)[0]
        return self.model.lm_head(normed)
