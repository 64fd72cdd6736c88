"""The persistent kernel between two state updates of a batched decode step (kernels/decode_block.py; under
TRITON_INTERPRET=1 each phase is its own launch) against float64 PyTorch: out_proj of the state kernel's gated
output, the folded gated norm's scale, the residual add, RMSNorm, in_proj and the conv step; and the model's
two-launches-per-layer step against its PyTorch step."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lit_mamba2 import reference  # noqa: E402
from lit_mamba2.kernels import decode_block  # noqa: E402
from lit_mamba2.kernels.decode_block import linear_block  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles and a grid small enough that every phase loops over several tiles per program, with masked tails."""
    monkeypatch.setattr(decode_block, "OUT_TILE", (16, 32))
    monkeypatch.setattr(decode_block, "IN_TILE", (16, 32))
    monkeypatch.setattr(decode_block, "PROGRAMS", 3)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _conv_reference(v, state0, w, cb):
    """One causal-conv step (+ SiLU) of v (rows, channels) after the window state0 (rows, channels, width - 1)."""
    window = torch.cat([state0.double(), v.double()[:, :, None]], dim=-1)
    out = reference.causal_conv1d(window.transpose(1, 2), w.double(), cb.double() if cb is not None else None,
                                  activation="silu")[:, -1]
    return out, window[:, :, 1:]


@pytest.mark.parametrize("case", ["middle", "first", "last"])
@pytest.mark.parametrize("dtype,residual_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_linear_block_equals_out_proj_add_norm_in_proj_conv(case, dtype, residual_dtype):
    g = torch.Generator().manual_seed(len(case))
    M, D, K, N, lo, cdim, width = 9, 40, 72, 100, 30, 50, 4  # conv channels [30, 80) of 100 columns
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    residual = r(M, D).to(residual_dtype).to(DEVICE)
    residual0 = residual.clone()
    nw = (torch.rand(D, generator=g) + 0.5).to(dtype).to(DEVICE)
    u, Wo = r(M, K).to(dtype).to(DEVICE), (r(D, K) / 8).to(dtype).to(DEVICE)
    sumsq = (torch.rand(M, 5, generator=g) * 20).to(DEVICE)
    hidden = r(M, D).to(dtype).to(DEVICE)
    Wi = (r(N, D) / 6).to(dtype).to(DEVICE)
    state = r(M, cdim, width - 1).to(dtype).to(DEVICE)
    cw, cb = r(cdim, width).to(dtype).to(DEVICE), r(cdim).to(dtype).to(DEVICE)
    state0 = state.clone()
    barrier = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    args = dict(u=u, out_weight=Wo, sumsq=sumsq, gated_eps=1e-5) if case != "first" else dict(hidden=hidden,
                                                                                             residual_in=False)
    if case != "last":
        args.update(in_weight=Wi, conv_state=state, conv_weight=cw, conv_bias=cb, conv_lo=lo)
    out = linear_block(residual, nw, 1e-5, barrier, **args)

    if case == "first":
        h = hidden.double()
    else:  # out_proj's output as stored in dtype, then the folded gated norm's scale
        h = (u.double() @ Wo.double().T).to(dtype).double() * torch.rsqrt(sumsq.double().sum(-1, keepdim=True) / K
                                                                          + 1e-5)
    r_ref = (h + (residual0.double() if case != "first" else 0)).to(residual_dtype)
    tol = 1e-6 if dtype == torch.float32 and residual_dtype == torch.float32 else 8e-3
    assert rel(residual, r_ref) < tol
    x_ref = reference.rmsnorm(r_ref.to(dtype).double(), nw.double(), 1e-5)
    if case == "last":
        assert out.shape == (M, D) and rel(out, x_ref) < (1e-6 if dtype == torch.float32 else 8e-3)
        return
    v = (x_ref.to(dtype).double() @ Wi.double().T).to(dtype)  # in_proj's output as stored
    conv, window = _conv_reference(v[:, lo:lo + cdim], state0, cw, cb)
    vtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(out[:, :lo], v[:, :lo]) < vtol and rel(out[:, lo + cdim:], v[:, lo + cdim:]) < vtol
    assert rel(out[:, lo:lo + cdim], conv) < vtol
    assert torch.equal(state[:, :, :-1], state0[:, :, 1:]) and rel(state[:, :, -1], v[:, lo:lo + cdim]) < vtol


def test_linear_block_refuses_bad_input():
    res, nw, bar = torch.zeros(4, 8), torch.ones(8), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="rows"):
        linear_block(torch.zeros(65, 8), nw, 1e-5, bar, hidden=torch.zeros(65, 8))
    with pytest.raises(ValueError, match="either"):
        linear_block(res, nw, 1e-5, bar)
    with pytest.raises(ValueError, match="do not fit"):
        linear_block(res, nw, 1e-5, bar, u=torch.zeros(4, 6), out_weight=torch.zeros(8, 5))
    with pytest.raises(ValueError, match="do not fit"):
        linear_block(res, nw, 1e-5, bar, hidden=torch.zeros(4, 8), in_weight=torch.zeros(20, 8),
                     conv_state=torch.zeros(4, 10, 3), conv_weight=torch.zeros(10, 3), conv_lo=5)


@pytest.mark.parametrize("dtype,residual_in_fp32", [(torch.float32, True), (torch.bfloat16, True),
                                                    (torch.bfloat16, False)])
def test_model_step_in_blocks_equals_pytorch_step(dtype, residual_in_fp32):
    """Decoder(blocks=True) (the state kernel with the gated norm folded + one linear_block per layer) against
    the PyTorch step from the same prefilled states, over a few tokens of a left-padded batch of 9 rows."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.generation import Decoder, pad_prompts
    from lit_mamba2.model import Mamba2LMHeadModel

    torch.manual_seed(0)
    # one norm group (ngroups 1), so that the gated norm folds; 3 layers: first, middle and last launches
    cfg = Mamba2Config.from_name("mamba2-test", n_layer=3, residual_in_fp32=residual_in_fp32,
                                 ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 16})
    model = Mamba2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p))
            if name.endswith("norm.weight"):  # not all ones: where each norm's weight goes matters
                p.uniform_(0.5, 1.5)
    model = model.to(dtype).to(DEVICE)
    prompts = [[5 + i, 6, 7, 8, 9][: 2 + i % 4] for i in range(9)]
    ids, seq_idx, lengths, pads = pad_prompts(prompts, DEVICE)
    outs = {}
    for impl, blocks in (("torch", False), ("triton", True)):
        with torch.no_grad():
            model.set_impl("torch")  # prefill: the PyTorch chunked path
            dec = Decoder(model, 9, 12, cuda_graph=False, ring_conv=False, fuse_linear=False, blocks=blocks,
                          fold_gated_norm=blocks, state_dtype=torch.float32)
            dec.prefill(ids, seq_idx, lengths, pads)
            model.set_impl(impl)
            outs[impl] = [dec.step(torch.arange(9, device=DEVICE) + t).clone() for t in (3, 40)]
    model.set_impl(None)
    for a, b in zip(outs["torch"], outs["triton"]):
        assert rel(b, a) < (1e-5 if dtype == torch.float32 else 3e-2)


def test_decoder_refuses_blocks_where_they_cannot_apply():
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.generation import Decoder
    from lit_mamba2.model import Mamba2LMHeadModel

    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2attn-test")).eval()
    model.set_impl("triton")
    dec = Decoder(model, 9, 12, cuda_graph=False, ring_conv=False, fuse_linear=False, blocks=True)
    with pytest.raises(ValueError, match="pure Mamba-2"):
        dec.step(torch.arange(9))
    model.set_impl(None)
