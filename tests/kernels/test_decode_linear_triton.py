"""The decode-time linear kernels with fused norms (TRITON_INTERPRET=1 on CPU) against float64 PyTorch: residual
add, RMSNorm (reference.rmsnorm) or gated RMSNorm (reference.gated_rmsnorm), then a plain matrix product, with the
roundings the unfused bf16 path makes. And the model's fused decode step against its PyTorch step."""

from kernel_testing import DEVICE, needs_interpreter_or_cuda, rel, spread_decays  # (first: it sets TRITON_INTERPRET)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lit_mamba2 import reference  # noqa: E402
from lit_mamba2.kernels.decode_linear import add_norm_linear, gated_norm_linear  # noqa: E402

pytestmark = needs_interpreter_or_cuda
# tiles small enough for several K chunks and N tiles at test sizes, with masked tails: one row per program (batch
# below GEMV_BELOW) or blocks of rows through tl.dot
def cfg(batch, single_pass):
    from lit_mamba2.kernels.decode_linear import GEMV_BELOW

    if batch < GEMV_BELOW:
        return (8, 32, 4, single_pass)  # BLOCK_N, BLOCK_K, warps
    return (16, 16, 32, 4, 1, single_pass)  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages


def tol(dtype):
    return 1e-6 if dtype == torch.float32 else 8e-3  # bf16: the output's own rounding


def _add_norm_linear_reference(hidden, residual, nw, W, bias, dtype, residual_dtype):
    """The residual add in float64, kept in the residual's dtype, then RMSNorm of it in the weight's dtype and the
    product (+ bias) in float64: (new residual, output)."""
    r_ref = (hidden.double() if hidden is not None else 0) + (residual.double() if residual is not None else 0)
    if residual_dtype is not None:
        r_ref = r_ref.to(residual_dtype).double()
    n = reference.rmsnorm(r_ref.to(dtype).double(), nw.double(), 1e-5).to(dtype).double()
    return r_ref, n @ W.double().T + (bias.double() if bias is not None else 0)


@pytest.mark.parametrize("single_pass", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 20])
@pytest.mark.parametrize("case,dtype,residual_dtype", [
    ("hidden+residual", torch.bfloat16, torch.float32), ("hidden", torch.bfloat16, torch.float32),
    ("residual", torch.bfloat16, torch.float32), ("hidden+residual", torch.float32, torch.float32),
    ("hidden+residual", torch.bfloat16, torch.bfloat16), ("lm_head", torch.bfloat16, None)])
def test_add_norm_linear_equals_add_rmsnorm_then_matmul(batch, case, dtype, residual_dtype, single_pass):
    g = torch.Generator().manual_seed(batch * 7 + len(case))
    K, N = 72, 45  # 72 = 2 chunks of 32 + a masked tail; 45 = 5 tiles of 8 + a tail
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    hidden = r(batch, K).to(dtype) if case != "residual" else None
    residual = r(batch, K).to(residual_dtype or torch.float32) if case != "hidden" else None
    nw, W, bias = (torch.rand(K, generator=g) + 0.5).to(dtype), (r(N, K) / 8).to(dtype), r(N).to(dtype)
    use_bias = case != "lm_head"
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    res_d = dev(residual)
    out, r_new = add_norm_linear(dev(hidden), res_d, dev(nw), 1e-5, dev(W), dev(bias) if use_bias else None,
                                 residual_dtype=residual_dtype, config=cfg(batch, single_pass))
    r_ref, ref = _add_norm_linear_reference(hidden, residual, nw, W, bias if use_bias else None, dtype, residual_dtype)
    assert out.shape == (batch, N) and out.dtype == dtype
    assert rel(out.cpu(), ref) < tol(dtype)
    if case == "lm_head":
        assert r_new is None
    elif case == "residual":
        assert r_new is res_d  # already the sum: passed through, not copied
    else:
        assert r_new.dtype == residual_dtype
        # exact in float32; in bf16 within its rounding (the interpreter rounds fp32 -> bf16 toward zero)
        assert rel(r_new.cpu(), r_ref) < (1e-12 if residual_dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("batch", [1, 2, 9])
@pytest.mark.parametrize("ngroups,norm_before_gate,dtype", [(1, False, torch.bfloat16), (2, False, torch.float32),
                                                            (2, True, torch.bfloat16), (1, True, torch.float32)])
@pytest.mark.parametrize("with_residual,single_pass", [(True, False), (False, True), (True, True)])
def test_gated_norm_linear_equals_gated_rmsnorm_then_matmul(batch, ngroups, norm_before_gate, dtype,
                                                            with_residual, single_pass):
    g = torch.Generator().manual_seed(ngroups * 10 + batch + 3 * norm_before_gate)
    K, N = 80, 37  # groups of 80 or 40 channels: chunks of 32 with masked tails
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # z as a strided view (a slice of in_proj's output, as the model passes it)
    y, z = r(batch, K).to(dtype), r(batch, K + 16).to(dtype)[:, 16:]
    nw, W = (torch.rand(K, generator=g) + 0.5).to(dtype), (r(N, K) / 8).to(dtype)
    residual = r(batch, N) if with_residual else None
    res_dev = residual.clone().to(DEVICE) if with_residual else None
    out = gated_norm_linear(y.to(DEVICE), z.to(DEVICE), nw.to(DEVICE), 1e-5, ngroups, norm_before_gate, W.to(DEVICE),
                            residual=res_dev, config=cfg(batch, single_pass))
    n = reference.gated_rmsnorm(y.double(), z.double(), nw.double(), 1e-5, K // ngroups, norm_before_gate)
    ref = n.to(dtype).double() @ W.double().T
    assert out.dtype == dtype and rel(out.cpu(), ref) < tol(dtype)
    if with_residual:  # residual += out, the output rounded to the model's dtype first
        torch.testing.assert_close(res_dev.cpu().double(), residual.double() + out.cpu().double(), rtol=1e-6,
                                   atol=1e-6)
        assert rel(res_dev.cpu() - residual, ref) < tol(dtype)


# _norm_gemv_kernel (whole rows per program): tiles of 256 weight elements, so K = 72 or 80 (padded to 128) gives 2
# weight rows per program and N = 45 / 37 a masked tail; each batch row has its own programs
ROW_CONFIG = (256, 2)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case,dtype,residual_dtype", [
    ("hidden+residual", torch.bfloat16, torch.float32), ("residual", torch.bfloat16, torch.float32),
    ("hidden+residual", torch.float32, torch.float32), ("hidden", torch.bfloat16, torch.bfloat16),
    ("lm_head", torch.bfloat16, None)])
def test_whole_row_gemv_equals_add_rmsnorm_then_matmul(batch, case, dtype, residual_dtype):
    g = torch.Generator().manual_seed(batch * 5 + len(case) + (dtype == torch.float32))
    K, N = 72, 45
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    hidden = r(batch, K).to(dtype) if case != "residual" else None
    residual = r(batch, K).to(residual_dtype or torch.float32) if case != "hidden" else None
    nw, W, bias = (torch.rand(K, generator=g) + 0.5).to(dtype), (r(N, K) / 8).to(dtype), r(N).to(dtype)
    use_bias = case not in ("lm_head", "residual")
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out, r_new = add_norm_linear(dev(hidden), dev(residual), dev(nw), 1e-5, dev(W), dev(bias) if use_bias else None,
                                 residual_dtype=residual_dtype, config=ROW_CONFIG)
    r_ref, ref = _add_norm_linear_reference(hidden, residual, nw, W, bias if use_bias else None, dtype, residual_dtype)
    assert out.shape == (batch, N) and out.dtype == dtype
    assert rel(out.cpu(), ref) < tol(dtype)
    if case in ("hidden+residual", "hidden"):
        assert rel(r_new.cpu(), r_ref) < (1e-12 if residual_dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("ngroups,norm_before_gate,dtype", [(1, False, torch.bfloat16), (2, False, torch.float32),
                                                            (4, True, torch.bfloat16), (2, True, torch.float32)])
def test_whole_row_gemv_equals_gated_rmsnorm_then_matmul_plus_residual(batch, ngroups, norm_before_gate, dtype):
    g = torch.Generator().manual_seed(ngroups * 3 + batch + 7 * norm_before_gate)
    K, N = 80, 37  # groups of 80, 40 or 20 channels in a row padded to 128
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    y, z = r(batch, K).to(dtype), r(batch, K + 16).to(dtype)[:, 16:]
    y = y * torch.linspace(0.2, 3.0, K).to(dtype)  # groups of different scales: a wrong group's rstd shows
    nw, W, bias = (torch.rand(K, generator=g) + 0.5).to(dtype), (r(N, K) / 8).to(dtype), r(N).to(dtype)
    residual = r(batch, N)
    res_dev = residual.clone().to(DEVICE)
    out = gated_norm_linear(y.to(DEVICE), z.to(DEVICE), nw.to(DEVICE), 1e-5, ngroups, norm_before_gate, W.to(DEVICE),
                            bias=bias.to(DEVICE), residual=res_dev, config=ROW_CONFIG)
    n = reference.gated_rmsnorm(y.double(), z.double(), nw.double(), 1e-5, K // ngroups, norm_before_gate)
    ref = n.to(dtype).double() @ W.double().T + bias.double()
    assert out.dtype == dtype and rel(out.cpu(), ref) < tol(dtype)
    torch.testing.assert_close(res_dev.cpu().double(), residual.double() + out.cpu().double(), rtol=1e-6, atol=1e-6)


def test_whole_row_gemv_is_the_default_below_gemv_below(monkeypatch):
    """The model's step picks _norm_gemv_kernel where the rows fit, the chunked kernel otherwise."""
    from lit_mamba2.kernels import decode_linear as dl

    assert dl.FULL_ROW and dl._full_rows(None, 768, 1) and dl._full_rows((4096, 4), 768, 1)
    assert not dl._full_rows((4, 512, 4, False), 768, 1)
    assert not dl._full_rows(None, 2 * dl.ROW_MAX_K, 1) and not dl._full_rows(None, 64, dl.ROW_MAX_GROUPS + 1)
    monkeypatch.setattr(dl, "FULL_ROW", False)
    assert not dl._full_rows(None, 768, 1)


def test_bad_shapes_are_named():
    W = torch.randn(8, 16)
    with pytest.raises(ValueError, match="residual"):
        add_norm_linear(torch.randn(2, 16), torch.randn(3, 16), torch.ones(16), 1e-5, W, residual_dtype=torch.float32)
    with pytest.raises(ValueError, match="groups"):
        gated_norm_linear(torch.randn(2, 16), torch.randn(2, 16), torch.ones(16), 1e-5, 3, False, W)


@pytest.mark.parametrize("preset,dtype,ring_conv,single_pass", [("mamba2-test", torch.float32, True, False),
                                                                ("mamba2attn-test", torch.float32, False, True),
                                                                ("mamba2-test", torch.bfloat16, True, True),
                                                                ("mamba2attn-test", torch.bfloat16, True, False)])
def test_model_fused_decode_step_equals_pytorch_step(preset, dtype, ring_conv, single_pass, monkeypatch):
    """The decode step with the fused linear kernels (Decoder(fuse_linear=True), Triton) against the
    PyTorch step from the same prefilled states, over a few tokens of a left-padded batch (hybrid: attention
    layers keep the unfused path, the layers around them fuse)."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.generation import pad_prompts
    from lit_mamba2.inference import Decoder
    from lit_mamba2.kernels import decode_linear
    from lit_mamba2.model import Mamba2LMHeadModel

    # wider tiles than the GPU's: fewer programs for the interpreter (the tiles do not change the function); the
    # single-pass cases run the chunked GEMV, the others the whole-row one (the default where rows fit)
    for name in ("CONFIG", "CONFIG_WIDE"):
        monkeypatch.setattr(decode_linear, name, (32, 64, 4, single_pass))
    monkeypatch.setattr(decode_linear, "FULL_ROW", not single_pass)
    torch.manual_seed(0)
    model = spread_decays(Mamba2LMHeadModel(Mamba2Config.from_name(preset)).eval()).to(dtype)
    ids, seq_idx, lengths, pads = pad_prompts([[5, 6, 7, 8, 9], [10, 11]], "cpu")
    outs = {}
    for impl, fuse in (("torch", False), ("triton", True)):
        with torch.no_grad():
            model.set_impl("torch")  # prefill: the PyTorch chunked path
            dec = Decoder(model, 2, 12, cuda_graph=False, ring_conv=ring_conv, fuse_linear=fuse,
                          state_dtype=torch.float32, impl=impl)
            dec.prefill(ids, seq_idx, lengths, pads)
            outs[impl] = [dec.step(torch.tensor([t, t + 1])).clone() for t in (3, 40)]
    model.set_impl(None)
    for a, b in zip(outs["torch"], outs["triton"]):
        assert rel(b, a) < (1e-5 if dtype == torch.float32 else 2e-2)
