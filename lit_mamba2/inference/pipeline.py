"""The decode step of a pure Mamba-2 model as a pipeline of row groups (kernels/decode_pipeline.py has the why and
the kernel): which group runs which stage of which layer in each launch."""

from __future__ import annotations

from typing import Optional

import torch

from lit_mamba2 import ops
from lit_mamba2.inference.step import MixerCache
from lit_mamba2.inference.weights import MixerWeights, ModelWeights

STAGES = 3  # I (norm + in_proj + conv), S (state update), O (out_proj + residual): one launch each


def unsupported_reason(weights: ModelWeights) -> Optional[str]:
    """Why the pipelined step cannot run this model (None when it can)."""
    for i, layer in enumerate(weights.layers):
        m = layer.mixer
        if not isinstance(m, MixerWeights):
            return f"layer {i} is an attention layer (the pipeline runs pure Mamba-2 models)"
        if layer.fc1 is not None:
            return f"layer {i} has an MLP"
        if not m.norm_commutes:
            return (f"layer {i}: the gated norm cannot fold (it needs one norm group with the gate before the "
                    f"norm, no channels beside the SSM and no out_proj bias)")
    return None


class RowPipeline:
    """Launch t runs, for each row group g, stage (t - g) % 3 of layer (t - g) // 3: with three groups every launch
    has one group in each stage, so one group's states stream while the other two groups' products run.
    `step` writes through fixed buffers and launches only, so a CUDA graph can capture it."""

    def __init__(self, weights: ModelWeights, states: list, slot: torch.Tensor, groups: int = 3):
        from lit_mamba2.kernels import decode_pipeline as kernels

        reason = unsupported_reason(weights)
        if reason is None and not all(isinstance(st, MixerCache) and st.ring for st in states):
            reason = "the conv states must be rings (Decoder(ring_conv=True))"
        if reason is not None:
            raise ValueError(f"row pipeline: {reason}")
        if not 1 <= groups <= STAGES:
            raise ValueError(f"row pipeline: groups must be 1..{STAGES}, got {groups}")
        self.weights = weights
        layers = weights.layers
        m0 = layers[0].mixer
        batch = states[0].ssm.shape[0]
        groups = min(groups, batch)
        weight = weights.lm_head
        self.residual_dtype = torch.float32 if weights.residual_in_fp32 else weight.dtype
        self.bufs = kernels.PipelineBuffers.allocate(batch, weights.embedding.shape[1], m0.d_ssm,
                                                     m0.in_proj.shape[0], m0.nheads, m0.headdim, m0.d_state,
                                                     weight.dtype, self.residual_dtype, weight.device)
        mixer_weights = []
        for i, layer in enumerate(layers):
            m = layer.mixer
            after = layers[i + 1].norm if i + 1 < len(layers) else weights.norm_f
            mixer_weights.append(kernels.MixerWeights(
                m.in_proj, m.in_proj_bias, layer.norm.eps, m.conv, m.conv_bias, m.A_log, m.D, m.dt_bias, m.dt_limit,
                m.norm.weight, m.norm.eps, m.out_proj, m.ngroups, after.weight))
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
            self.stages.append(kernels.prepare_stage(self.bufs, m0.nheads, m0.headdim, m0.d_state, block_m, roles[0],
                                             roles[2], roles[1]))

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (batch,) -> logits (batch, padded_vocab); the states advance in place."""
        from lit_mamba2.kernels import decode_pipeline as kernels

        w, bufs = self.weights, self.bufs
        kernels.embed_rows(token, w.embedding, w.layers[0].norm.weight, bufs)
        for stage in self.stages:
            kernels.launch_stage(stage)
        normed = ops.add_rmsnorm(bufs.residual, None, w.norm_f.weight, w.norm_f.eps, self.residual_dtype,
                                 impl="triton")[0]
        return torch.nn.functional.linear(normed, w.lm_head)
