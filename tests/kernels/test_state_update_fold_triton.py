"""The gated RMSNorm folded into the decode step (Decoder fold_gated_norm), under TRITON_INTERPRET=1 on CPU:
the state kernels' u = y * silu(z) * w and partial sums of (y * silu(z))^2 against float64 reference.py ops, the
add+norm that finishes the fold against the residual add of reference.gated_rmsnorm's output, and whole decode
steps of tiny models against the eager PyTorch step (which runs the separate gated norm)."""

from kernel_testing import DEVICE, needs_interpreter_or_cuda, rel, spread_decays  # (first: it sets TRITON_INTERPRET)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lit_mamba2 import reference  # noqa: E402
from lit_mamba2.kernels.state_update import add_rmsnorm, mixer_step, state_update  # noqa: E402

pytestmark = needs_interpreter_or_cuda
EPS = 1e-5


def block_sums(v, block_p):
    """(b, h, p) -> (b, h * ceil(p / block_p)): each headdim block's sum of squares, head-major (the kernel's
    slot order: head, then block)."""
    b, h, p = v.shape
    nb = -(-p // block_p)
    padded = torch.cat([v, v.new_zeros(b, h, nb * block_p - p)], dim=-1)
    return padded.pow(2).view(b, h, nb, block_p).sum(-1).reshape(b, h * nb)


def check_fold(u, sumsq, y_gated, y_plain, z, w, block_p, tol):
    """u and the partials against the float64 reference; then u * rstd against reference.gated_rmsnorm."""
    b, h, p = y_gated.shape
    assert sumsq.dtype == torch.float32 and sumsq.shape == (b, h * -(-p // block_p))
    assert rel(u.cpu(), y_gated * w.view(h, p)) < tol
    assert rel(sumsq.cpu(), block_sums(y_gated, block_p)) < 1e-5
    rstd = torch.rsqrt(sumsq.cpu().double().sum(-1) / (h * p) + EPS)
    normed = reference.gated_rmsnorm(y_plain.reshape(b, h * p), z.reshape(b, h * p).double(), w, EPS)
    assert rel(u.cpu().double().reshape(b, h * p) * rstd[:, None], normed) < tol


@pytest.mark.parametrize("headdim,block_p,dtype", [(16, None, torch.float32), (12, 8, torch.float32),
                                                   (16, 8, torch.bfloat16)])
def test_state_update_folded_norm_equals_recurrence_then_gated_rmsnorm(headdim, block_p, dtype):
    """One recurrence step (reference.ssd_recurrent, float64) gated by silu(z), times the norm weight; the
    partials per (head, headdim block), and their sum giving reference.gated_rmsnorm. headdim 12 with blocks of
    8: two programs per head, the second with a masked tail."""
    g = torch.Generator().manual_seed(headdim + (block_p or 0))
    b, h, n, ng = 3, 4, 16, 2
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state0 = r(b, h, headdim, n)
    x, z, dt, B, C = (t.to(dtype) for t in (r(b, h, headdim), r(b, h, headdim), r(b, h), r(b, ng, n), r(b, ng, n)))
    A_log, dt_bias, D = torch.rand(h, generator=g) * 2, r(h), r(h)
    w = (torch.rand(h * headdim, generator=g) + 0.5).to(dtype)
    state = state0.clone().to(DEVICE)
    u, sumsq = state_update(state, x.to(DEVICE), dt.to(DEVICE), A_log.to(DEVICE), B.to(DEVICE), C.to(DEVICE),
                            D=D.to(DEVICE), z=z.to(DEVICE), dt_bias=dt_bias.to(DEVICE), dt_softplus=True,
                            A_is_log=True, norm_weight=w.to(DEVICE), block_p=block_p)
    assert u.dtype == dtype
    ref = {}
    for gate in (True, False):
        y_ref, state_ref = reference.ssd_recurrent(
            x[:, None].double(), dt[:, None].double(), -torch.exp(A_log.double()), B[:, None].double(),
            C[:, None].double(), D=D.double(), z=z[:, None].double() if gate else None, dt_bias=dt_bias.double(),
            initial_states=state0.double(), dt_softplus=True, return_final_states=True)
        ref[gate] = y_ref[:, 0]
    assert rel(state.cpu(), state_ref) < 1e-5
    check_fold(u, sumsq, ref[True], ref[False], z, w.double(), block_p or headdim,
               1e-5 if dtype == torch.float32 else 1e-2)  # bf16: u's rounding (2^-8 relative)


def test_mixer_step_folded_norm_equals_conv_recurrence_then_gated_rmsnorm():
    """The ring kernel (conv + state update) with the fold: reference.causal_conv1d over the ring's history, one
    reference.ssd_recurrent step, then the same checks as the state kernel's."""
    g = torch.Generator().manual_seed(11)
    b, h, p, n, ng, width, slot = 2, 4, 12, 8, 1, 4, 6
    conv_dim = h * p + 2 * ng * n
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state0, ring0 = r(b, h, p, n), r(b, conv_dim, width)
    cw, cb, A_log, dt_bias, D = r(conv_dim, width), r(conv_dim), r(h), r(h), r(h)
    xBC, dt, z = r(b, conv_dim), r(b, h), r(b, h, p)
    w = torch.rand(h * p, generator=g) + 0.5
    state, ring = state0.clone().to(DEVICE), ring0.clone().to(DEVICE)
    u, sumsq = mixer_step(state, ring, torch.tensor(slot, device=DEVICE), xBC.to(DEVICE), cw.to(DEVICE),
                          cb.to(DEVICE), dt.to(DEVICE), A_log.to(DEVICE), D=D.to(DEVICE), z=z.to(DEVICE),
                          dt_bias=dt_bias.to(DEVICE), ngroups=ng, norm_weight=w.to(DEVICE), block_p=8)
    hist = ring0[:, :, [(slot + 1 + k) % width for k in range(width - 1)]].double()
    conv = reference.causal_conv1d(xBC[:, None].double(), cw.double(), cb.double(), initial_states=hist,
                                   activation="silu")
    xs, B, C = conv[:, 0].split([h * p, ng * n, ng * n], dim=-1)
    ref = {}
    for gate in (True, False):
        y_ref = reference.ssd_recurrent(
            xs.view(b, 1, h, p), dt[:, None].double(), -torch.exp(A_log.double()), B.view(b, 1, ng, n),
            C.view(b, 1, ng, n), D=D.double(), z=z[:, None].double() if gate else None, dt_bias=dt_bias.double(),
            initial_states=state0.double(), dt_softplus=True)
        ref[gate] = y_ref[:, 0]
    check_fold(u, sumsq, ref[True], ref[False], z, w.double(), 8, 1e-5)


@pytest.mark.parametrize("residual_dtype,dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16)])
def test_add_rmsnorm_scales_hidden_by_the_partials_rstd(residual_dtype, dtype):
    """residual + hidden * rsqrt(sum(partials) / n + eps) in residual_dtype, then RMSNorm in the weight's dtype."""
    g = torch.Generator().manual_seed(6)
    b, d, parts, n, h_eps = 3, 200, 5, 96, 1e-3
    hidden = (torch.randn(b, d, generator=g) * 7).to(dtype)
    residual = torch.randn(b, d, generator=g).to(residual_dtype)
    sumsq = torch.rand(b, parts, generator=g) * 30
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    out, r = add_rmsnorm(hidden.to(DEVICE), residual.to(DEVICE), w.to(DEVICE), EPS, residual_dtype,
                         hidden_rms=(sumsq.to(DEVICE), n, h_eps))
    rstd = 1.0 / torch.sqrt(sumsq.double().sum(-1, keepdim=True) / n + h_eps)
    r_ref = residual.double() + hidden.double() * rstd
    assert r.dtype == residual_dtype and rel(r.cpu(), r_ref) < (1e-6 if residual_dtype == torch.float32 else 1e-2)
    ref = reference.rmsnorm(r_ref.to(residual_dtype).to(dtype).double(), w.double(), EPS)
    assert out.dtype == dtype and rel(out.cpu(), ref) < (1e-6 if dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------------------------------------------------------
def fold_model(preset, residual_in_fp32, dtype, **overrides):
    """A tiny model whose Mamba-2 norms have one group (ngroups 1), so that the fold applies."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.model import Mamba2LMHeadModel

    torch.manual_seed(0)
    cfg = Mamba2Config.from_name(preset, residual_in_fp32=residual_in_fp32,
                                 ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 16}, **overrides)
    model = spread_decays(Mamba2LMHeadModel(cfg).eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones: the weights' placement matters
                p.uniform_(0.5, 1.5)
    return model.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("preset,overrides,residual_in_fp32,dtype", [
    ("mamba2-test", {}, True, torch.float32),
    ("mamba2-test", {}, False, torch.bfloat16),
    ("mamba2-test", {}, True, torch.bfloat16),
    ("mamba2attn-test", {}, False, torch.float32),  # Mamba-2 -> MLP's norm2, final norm
    ("mamba2attn-test", {"d_intermediate": 0}, True, torch.bfloat16),  # Mamba-2 -> attention block's norm
])
def test_decode_step_with_folded_norm_equals_pytorch_step(preset, overrides, residual_in_fp32, dtype, monkeypatch):
    """Decoder(fold_gated_norm=True) steps through the Triton kernels (ring conv and shifted conv) against the
    eager PyTorch step (separate gated norm, PyTorch add+norm) from the same prefilled states, over 3 tokens of a
    left-padded batch. The separate gated norm must not run in the folded steps."""
    from lit_mamba2 import ops
    from lit_mamba2.generation import pad_prompts
    from lit_mamba2.inference import Decoder

    model = fold_model(preset, residual_in_fp32, dtype, **overrides)
    calls = []
    gated_rmsnorm = ops.gated_rmsnorm
    monkeypatch.setattr(ops, "gated_rmsnorm", lambda *a, **k: calls.append(1) or gated_rmsnorm(*a, **k))
    ids, seq_idx, lengths, pads = pad_prompts([[5, 6, 7, 8, 9], [10, 11]], DEVICE)
    outs = {}
    for impl, ring in (("torch", False), ("triton", True), ("triton", False)):
        with torch.no_grad():
            model.set_impl("torch")  # prefill: the PyTorch chunked path
            dec = Decoder(model, 2, 12, cuda_graph=False, ring_conv=ring, fuse_linear=False,
                          fold_gated_norm=impl == "triton", impl=impl)
            dec.prefill(ids, seq_idx, lengths, pads)
            calls.clear()
            outs[impl, ring] = [dec.step(torch.tensor([t, t + 1], device=DEVICE)).clone().float()
                                for t in (3, 40, 7)]
            assert (len(calls) == 0) == (impl == "triton")
    model.set_impl(None)
    # float32: only summation order differs (measured 2.7e-7). bf16 (measured ~1e-2, as the unfolded Triton step
    # against the same PyTorch step): the unfolded step rounds the normed y and out_proj's output of
    # it to bf16, the folded one u = y * silu(z) * w and out_proj's output of u (each ~2^-8 relative, over a few
    # layers and the tied LM head), while both decode from the same bf16 states
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for ring in (True, False):
        for a, b in zip(outs["torch", False], outs["triton", ring]):
            assert rel(b, a) < tol, (ring, rel(b, a))


def test_fold_applies_only_where_the_norm_commutes_with_out_proj():
    """Two norm groups, norm_before_gate, an out_proj bias: the mixer keeps the separate gated norm."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.inference.weights import MixerWeights
    from lit_mamba2.model import Mamba2LMHeadModel

    base = {"d_state": 16, "headdim": 16, "chunk_size": 16}
    for ssm, ok in (({"ngroups": 1}, True), ({"ngroups": 2}, False), ({"ngroups": 1, "norm_before_gate": True}, False),
                    ({"ngroups": 1, "bias": True}, False), ({"ngroups": 1, "rmsnorm": False}, False)):
        model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test", ssm_cfg={**base, **ssm}))
        assert MixerWeights.of(model.backbone.layers[0].mixer).norm_commutes == ok, ssm


@pytest.mark.parametrize("preset,overrides,ring_conv", [("mamba2-test", {}, True),
                                                        ("mamba2attn-test", {"d_intermediate": 0}, False)])
def test_batch8_greedy_decoding_through_kernels_equals_full_forward_greedy(preset, overrides, ring_conv):
    """Batch 8 with the Decoder's defaults there (cuBLAS-style linears, fold_gated_norm on) through the Triton step
    kernels: greedy tokens equal greedy decoding by full PyTorch forward passes over the growing sequence."""
    from lit_mamba2.inference import Decoder

    model = fold_model(preset, True, torch.float32, **overrides)
    b, L, new = 8, 19, 5  # 19 > one SSD chunk (16)
    prompt = torch.randint(1, 256, (b, L), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    dec = Decoder(model, b, L + new, cuda_graph=False, ring_conv=ring_conv, impl="triton")
    assert dec.fold_gated_norm and not dec.fuse_linear
    vocab = model.config.vocab_size
    with torch.no_grad():
        model.set_impl("torch")  # prefill: the PyTorch chunked path
        logits = dec.prefill(prompt)
        model.set_impl("triton")
        tokens = []
        for i in range(new):
            tokens.append(logits[:, :vocab].argmax(-1))
            if i + 1 < new:
                logits = dec.step(tokens[-1])
        model.set_impl("torch")
        seq = prompt
        for _ in range(new):
            seq = torch.cat([seq, model(seq)[:, -1, :vocab].argmax(-1)[:, None]], dim=1)
    model.set_impl(None)
    assert torch.equal(torch.stack(tokens, 1), seq[:, L:])


def test_decoder_fold_option_defaults_and_conflict():
    """On the Triton path fold_gated_norm follows fuse_linear by default (on from batch 8), an explicit True turns
    the fused GEMVs off, and asking for both is an error; the PyTorch path defaults to the plain step."""
    from lit_mamba2.inference import Decoder

    model = fold_model("mamba2-test", True, torch.float32)
    flags = lambda d: (d.fuse_linear, d.fold_gated_norm)  # noqa: E731
    assert flags(Decoder(model, 1, 8, cuda_graph=False, impl="triton")) == (True, False)
    assert flags(Decoder(model, 8, 8, cuda_graph=False, impl="triton")) == (False, True)
    assert flags(Decoder(model, 1, 8, cuda_graph=False, fold_gated_norm=True, impl="triton")) == (False, True)
    assert flags(Decoder(model, 8, 8, cuda_graph=False, fold_gated_norm=False, impl="triton")) == (False, False)
    assert flags(Decoder(model, 1, 8, cuda_graph=False, impl="torch")) == (False, False)  # the plain step on CPU
    with pytest.raises(ValueError, match="fold_gated_norm"):
        Decoder(model, 8, 8, cuda_graph=False, fuse_linear=True, fold_gated_norm=True)
