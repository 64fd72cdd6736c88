"""The one-token Triton kernels (under TRITON_INTERPRET=1 on CPU) against reference.py's recurrence and conv in
float64: one step of `ssd_recurrent` from the same initial state, and one position of `causal_conv1d`."""

import math

from kernel_testing import DEVICE, needs_interpreter_or_cuda, rel, spread_decays  # (first: it sets TRITON_INTERPRET)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lit_mamba2 import reference  # noqa: E402
from lit_mamba2.kernels.state_update import add_rmsnorm, conv_step, mixer_step, state_update  # noqa: E402

pytestmark = needs_interpreter_or_cuda


@pytest.mark.parametrize("ngroups,headdim,dstate", [(1, 8, 16), (2, 12, 8)])  # 12, 8: masked tails
@pytest.mark.parametrize("D_kind", ["head", "hdim", None])
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.02, 0.4)])
def test_state_update_equals_one_recurrence_step(ngroups, headdim, dstate, D_kind, with_z, dt_limit):
    g = torch.Generator().manual_seed(hash((ngroups, headdim, D_kind, with_z, dt_limit)) % 2**31)
    b, h = 3, 4
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state0, x, dt, B, C, z = r(b, h, headdim, dstate), r(b, h, headdim), r(b, h), r(b, ngroups, dstate), \
        r(b, ngroups, dstate), r(b, h, headdim)
    A = -torch.rand(h, generator=g) * 4 - 0.1
    dt_bias = r(h)
    D = {"head": r(h), "hdim": r(h, headdim), None: None}[D_kind]
    # the kernel takes strided views (slices of in_proj's output): give it a non-contiguous x
    x_strided = torch.cat([x, r(b, h, headdim)], dim=-1)[..., :headdim]
    state = state0.clone().to(DEVICE)
    y = state_update(state, x_strided.to(DEVICE), dt.to(DEVICE), A.to(DEVICE), B.to(DEVICE), C.to(DEVICE),
                     D=None if D is None else D.to(DEVICE), z=z.to(DEVICE) if with_z else None,
                     dt_bias=dt_bias.to(DEVICE), dt_softplus=True, dt_limit=dt_limit)
    y_ref, state_ref = reference.ssd_recurrent(
        x[:, None].double(), dt[:, None].double(), A.double(), B[:, None].double(), C[:, None].double(),
        D=None if D is None else D.double(), z=z[:, None].double() if with_z else None, dt_bias=dt_bias.double(),
        initial_states=state0.double(), dt_softplus=True, dt_limit=dt_limit, return_final_states=True)
    assert rel(y.cpu(), y_ref[:, 0]) < 1e-5
    assert rel(state.cpu(), state_ref) < 1e-5


def test_state_update_takes_A_log_and_bf16_inputs():
    g = torch.Generator().manual_seed(1)
    b, h, p, n = 2, 4, 16, 16
    state0 = torch.randn(b, h, p, n, generator=g)
    x, z = torch.randn(b, h, p, generator=g).bfloat16(), torch.randn(b, h, p, generator=g).bfloat16()
    dt, B, C = torch.randn(b, h, generator=g).bfloat16(), torch.randn(b, 1, n, generator=g).bfloat16(), \
        torch.randn(b, 1, n, generator=g).bfloat16()
    A_log = torch.rand(h, generator=g) * 2
    state = state0.clone().to(DEVICE)
    y = state_update(state, x.to(DEVICE), dt.to(DEVICE), A_log.to(DEVICE), B.to(DEVICE), C.to(DEVICE), z=z.to(DEVICE),
                     dt_softplus=True, A_is_log=True)
    assert y.dtype == torch.bfloat16
    y_ref, state_ref = reference.ssd_recurrent(
        x[:, None].double(), dt[:, None].double(), -torch.exp(A_log.double()), B[:, None].double(),
        C[:, None].double(), z=z[:, None].double(), initial_states=state0.double(), dt_softplus=True,
        return_final_states=True)
    assert rel(y.cpu(), y_ref[:, 0]) < 1e-2  # bf16 output rounding
    assert rel(state.cpu(), state_ref) < 1e-5


@pytest.mark.parametrize("width,activation,bias", [(4, "silu", True), (2, None, False), (3, "silu", False)])
def test_conv_step_equals_causal_conv1d_at_one_position(width, activation, bias):
    g = torch.Generator().manual_seed(width)
    b, d = 3, 300  # d > one block of 256 channels: the tail is masked
    x = torch.randn(b, d, generator=g)
    conv0 = torch.randn(b, d, width - 1, generator=g)
    w = torch.randn(d, width, generator=g)
    bias_t = torch.randn(d, generator=g) if bias else None
    conv = conv0.clone().to(DEVICE)
    out = conv_step(x.to(DEVICE), conv, w.to(DEVICE), None if bias_t is None else bias_t.to(DEVICE), activation)
    ref, ref_state = reference.causal_conv1d(x[:, None].double(), w.double(),
                                             None if bias_t is None else bias_t.double(),
                                             initial_states=conv0.double(), return_final_states=True,
                                             activation=activation)
    assert rel(out.cpu(), ref[:, 0]) < 1e-6
    torch.testing.assert_close(conv.cpu().double(), ref_state, rtol=0, atol=0)


@pytest.mark.parametrize("preset,ring_conv", [("mamba2-test", True), ("mamba2-test", False),
                                              ("mamba2attn-test", True)])
def test_model_decode_step_through_kernels_equals_pytorch_step(preset, ring_conv):
    """The decode step with the Triton kernels (impl="triton") against its PyTorch step, from the same
    prefilled state, over a few tokens of a left-padded batch (attention layers: conv kernel without SiLU)."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.generation import pad_prompts
    from lit_mamba2.inference import Decoder
    from lit_mamba2.model import Mamba2LMHeadModel

    torch.manual_seed(0)
    model = spread_decays(Mamba2LMHeadModel(Mamba2Config.from_name(preset)).eval())
    ids, seq_idx, lengths, pads = pad_prompts([[5, 6, 7, 8, 9], [10, 11]], "cpu")
    outs = {}
    for impl in ("torch", "triton"):
        with torch.no_grad():
            model.set_impl("torch")  # prefill: the PyTorch chunked path
            # the unfused step kernels (fuse_linear: tests/kernels/test_decode_linear_triton.py)
            dec = Decoder(model, 2, 12, cuda_graph=False, ring_conv=ring_conv and impl == "triton",
                          fuse_linear=False, fold_gated_norm=False, impl=impl)
            dec.prefill(ids, seq_idx, lengths, pads)
            outs[impl] = [dec.step(torch.tensor([t, t + 1])).clone() for t in (3, 40, 7)]
    model.set_impl(None)
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_residual,residual_dtype,dtype", [(True, torch.float32, torch.bfloat16),
                                                                (False, torch.float32, torch.float32),
                                                                (True, torch.bfloat16, torch.bfloat16)])
def test_add_rmsnorm_equals_residual_add_then_rmsnorm(with_residual, residual_dtype, dtype):
    g = torch.Generator().manual_seed(4)
    b, d = 3, 200
    hidden = torch.randn(b, d, generator=g).to(dtype)
    residual = torch.randn(b, d, generator=g).to(residual_dtype) if with_residual else None
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    out, r = add_rmsnorm(hidden.to(DEVICE), None if residual is None else residual.to(DEVICE), w.to(DEVICE), 1e-5,
                         residual_dtype)
    r_ref = hidden.double() + (residual.double() if residual is not None else 0)
    assert r.dtype == residual_dtype and rel(r.cpu(), r_ref) < (1e-6 if residual_dtype == torch.float32 else 1e-2)
    x = r_ref.to(residual_dtype).to(dtype).double()  # the block normalises the residual in the weight's dtype
    ref = reference.rmsnorm(x, w.double(), 1e-5)
    assert out.dtype == dtype and rel(out.cpu(), ref) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("ngroups,headdim,dstate,with_z,D_hdim", [(1, 16, 16, False, False), (2, 12, 8, True, True)])
@pytest.mark.parametrize("slot,slot_major", [(0, True), (5, True), (5, False)])
def test_fused_mixer_step_equals_conv_then_recurrence(ngroups, headdim, dstate, with_z, D_hdim, slot, slot_major):
    """Conv over a ring of inputs + SiLU, then one recurrence step: against reference.causal_conv1d (the ring
    unrolled oldest first) and reference.ssd_recurrent from the same state, over several consecutive tokens."""
    g = torch.Generator().manual_seed(slot + ngroups)
    b, h, width = 2, 4, 4
    conv_dim = h * headdim + 2 * ngroups * dstate
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state0, ring0 = r(b, h, headdim, dstate), r(b, conv_dim, width)
    w, cb, A_log, dt_bias = r(conv_dim, width), r(conv_dim), r(h), r(h)
    D = r(h, headdim) if D_hdim else r(h)
    state, ring = state0.clone().to(DEVICE), ring0.clone().to(DEVICE)
    if slot_major:  # the Decoder's layout: (batch, width, conv_dim) storage seen as (batch, conv_dim, width)
        ring = ring0.transpose(1, 2).contiguous().to(DEVICE).transpose(1, 2)
    w, cb, A_log, dt_bias, D = (t.to(DEVICE) for t in (w, cb, A_log, dt_bias, D))
    # the ring's history oldest first: slots slot+1, ..., slot+width-1
    hist = ring0[:, :, [(slot + 1 + k) % width for k in range(width - 1)]].double()
    st_ref = state0.double()
    for t in range(3):
        xBC, dt, z = r(b, conv_dim), r(b, h), r(b, h, headdim)
        y = mixer_step(state, ring, torch.tensor(slot + t, device=DEVICE), xBC.to(DEVICE), w, cb, dt.to(DEVICE),
                       A_log, D=D, z=z.to(DEVICE) if with_z else None, dt_bias=dt_bias, ngroups=ngroups).cpu()
        w, cb, A_log, dt_bias, D = (t.cpu() for t in (w, cb, A_log, dt_bias, D))
        conv, hist = reference.causal_conv1d(xBC[:, None].double(), w.double(), cb.double(), initial_states=hist,
                                             return_final_states=True, activation="silu")
        x, B, C = conv[:, 0].split([h * headdim, ngroups * dstate, ngroups * dstate], dim=-1)
        y_ref, st_ref = reference.ssd_recurrent(
            x.view(b, 1, h, headdim), dt[:, None].double(), -torch.exp(A_log.double()),
            B.view(b, 1, ngroups, dstate), C.view(b, 1, ngroups, dstate), D=D.double(),
            z=z[:, None].double() if with_z else None, dt_bias=dt_bias.double(), initial_states=st_ref,
            dt_softplus=True, return_final_states=True)
        assert rel(y, y_ref[:, 0]) < 1e-5
        assert rel(state.cpu(), st_ref) < 1e-5
        w, cb, A_log, dt_bias, D = (t.to(DEVICE) for t in (w, cb, A_log, dt_bias, D))
