"""The reference causal conv1d and gated RMSNorm against naive loops written out here."""

import pytest
import torch
import torch.nn.functional as F

from lit_mamba2 import reference as R

F64 = torch.float64


def naive_conv(x, w, bias, seq_idx, init, activation):
    b, L, d = x.shape
    width = w.shape[1]
    out = torch.zeros_like(x)
    for i in range(b):
        for t in range(L):
            acc = bias.clone() if bias is not None else torch.zeros(d, dtype=x.dtype)
            for k in range(width):
                src = t - (width - 1) + k
                if src < 0:
                    if init is not None and (seq_idx is None or seq_idx[i, t] == seq_idx[i, 0]):
                        acc += w[:, k] * init[i, :, width - 1 + src]
                elif seq_idx is None or seq_idx[i, src] == seq_idx[i, t]:
                    acc += w[:, k] * x[i, src]
            out[i, t] = F.silu(acc) if activation == "silu" else acc
    return out


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("with_seq_idx", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
def test_causal_conv1d_matches_naive_loop(width, with_seq_idx, with_init):
    g = torch.Generator().manual_seed(width)
    b, L, d = 2, 13, 5
    x = torch.randn(b, L, d, generator=g, dtype=F64)
    w = torch.randn(d, width, generator=g, dtype=F64)
    bias = torch.randn(d, generator=g, dtype=F64)
    seq_idx = torch.tensor([[0] * 4 + [1] * 1 + [2] * 8, [5] * 13], dtype=torch.int32) if with_seq_idx else None
    init = torch.randn(b, d, width - 1, generator=g, dtype=F64) if with_init else None
    for act in ("silu", None):
        out, final = R.causal_conv1d(x, w, bias, seq_idx, init, True, act)
        torch.testing.assert_close(out, naive_conv(x, w, bias, seq_idx, init, act), rtol=0, atol=1e-12)
    # the final state: the last width-1 inputs (each row's last document here is longer than width - 1)
    full = torch.cat([init if init is not None else torch.zeros(b, d, width - 1, dtype=F64), x.transpose(1, 2)], 2)
    expect = full[:, :, -(width - 1):].clone()
    torch.testing.assert_close(final, expect, rtol=0, atol=0)


def test_conv_final_state_zeroes_inputs_from_earlier_documents():
    x = torch.arange(1.0, 7.0, dtype=F64).view(1, 6, 1)
    seq_idx = torch.tensor([[0, 0, 0, 0, 0, 1]], dtype=torch.int32)
    _, final = R.causal_conv1d(x, torch.ones(1, 4, dtype=F64), None, seq_idx, None, True, None)
    assert final.flatten().tolist() == [0.0, 0.0, 6.0]


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("groups", [1, 3])
def test_gated_rmsnorm_matches_formula(norm_before_gate, groups):
    g = torch.Generator().manual_seed(groups)
    x = torch.randn(4, 12, generator=g, dtype=F64)
    z = torch.randn(4, 12, generator=g, dtype=F64)
    w = torch.randn(12, generator=g, dtype=F64)
    out = R.gated_rmsnorm(x, z, w, eps=1e-5, group_size=12 // groups, norm_before_gate=norm_before_gate)
    expect = torch.empty_like(x)
    for r in range(4):
        for k in range(groups):
            sl = slice(k * 12 // groups, (k + 1) * 12 // groups)
            v = x[r, sl] if norm_before_gate else x[r, sl] * z[r, sl] * torch.sigmoid(z[r, sl])
            v = v / torch.sqrt((v * v).mean() + 1e-5) * w[sl]
            expect[r, sl] = v * z[r, sl] * torch.sigmoid(z[r, sl]) if norm_before_gate else v
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-12)


def test_ops_name_the_argument_that_is_wrong():
    import math

    from lit_mamba2 import gated_rmsnorm, ssd

    b, L, h, p, g, n = 2, 13, 2, 4, 2, 3
    x, dt, A = torch.randn(b, L, h, p), torch.rand(b, L, h), -torch.rand(h)
    B, C = torch.randn(b, L, g, n), torch.randn(b, L, g, n)
    with pytest.raises(ValueError, match=r"ssd: B and C must have one shape"):
        ssd(x, dt, A, B[..., :2], C, 4)
    with pytest.raises(TypeError, match=r"ssd: D must be a torch\.Tensor"):
        ssd(x, dt, A, B, C, 4, D=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"ssd: dt_limit must be \(low, high\)"):
        ssd(x, dt, A, B, C, 4, dt_limit=None)
    with pytest.raises(ValueError, match=r"ssd: chunk_size must be a positive int, got True"):
        ssd(x, dt, A, B, C, True)
    assert ssd(x, dt, A, B, C, 4, dt_limit=[0.0, math.inf]).shape == x.shape
    with pytest.raises(TypeError, match=r"gated_rmsnorm: z must be a torch\.Tensor"):
        gated_rmsnorm(x, [1], torch.ones(p))


def test_model_names_bad_input_ids_and_seq_idx():
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.model import Mamba2LMHeadModel

    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test"))
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match=r"at least one token per row"):
        model(ids[:, :0])
    with pytest.raises(TypeError, match=r"seq_idx must be int32"):
        model(ids, seq_idx=torch.zeros(2, 5, dtype=torch.long))
