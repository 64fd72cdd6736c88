"""Round-2 decode paths under TRITON_INTERPRET=1 against independent references: the gated RMSNorm folded into
out_proj (mixer_step's sum-of-squares epilogue, add_rmsnorm's pending 1/rms, the whole model step) and PDL, which
must be a no-op where it is unsupported (here: the interpreter)."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from lit_mamba2 import reference  # noqa: E402
from lit_mamba2.kernels import pdl  # noqa: E402
from lit_mamba2.kernels.state_update import add_rmsnorm, mixer_step  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_pdl_is_off_under_the_interpreter():
    assert not pdl.supported()
    with pdl.launching() as on:
        assert on is False and pdl.options() == dict(USE_PDL=False)
    assert pdl.options() == dict(USE_PDL=False)


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("headdim", [16, 12])  # 12: masked rows must not enter the sum of squares
def test_mixer_step_gathers_the_gated_norms_sum_of_squares(norm_before_gate, headdim):
    """y * silu(z) and sum over the row of (y * silu(z))^2 (of y^2 with norm_before_gate), accumulated over two
    tokens into the same buffer, against reference.causal_conv1d + reference.ssd_recurrent in float64."""
    g = torch.Generator().manual_seed(7 + headdim)
    b, h, dstate, ngroups, width = 3, 4, 8, 1, 4
    conv_dim = h * headdim + 2 * ngroups * dstate
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state0, ring0 = r(b, h, headdim, dstate), r(b, conv_dim, width)
    w, cb, A_log, dt_bias, D = r(conv_dim, width), r(conv_dim), r(h), r(h), r(h)
    state, ring = state0.clone().to(DEVICE), ring0.clone().to(DEVICE)
    ss = torch.zeros(b, device=DEVICE)
    hist = ring0[:, :, [(1 + k) % width for k in range(width - 1)]].double()
    st_ref, ss_ref = state0.double(), torch.zeros(b, dtype=torch.float64)
    for t in range(2):
        xBC, dt, z = r(b, conv_dim), r(b, h), r(b, h, headdim)
        gy = mixer_step(state, ring, torch.tensor(t, device=DEVICE), xBC.to(DEVICE), w.to(DEVICE), cb.to(DEVICE),
                        dt.to(DEVICE), A_log.to(DEVICE), D=D.to(DEVICE), z=z.to(DEVICE), dt_bias=dt_bias.to(DEVICE),
                        ngroups=ngroups, norm_sum_sq=ss, norm_before_gate=norm_before_gate).cpu()
        conv, hist = reference.causal_conv1d(xBC[:, None].double(), w.double(), cb.double(), initial_states=hist,
                                             return_final_states=True, activation="silu")
        x, B, C = conv[:, 0].split([h * headdim, ngroups * dstate, ngroups * dstate], dim=-1)
        y, st_ref = reference.ssd_recurrent(
            x.view(b, 1, h, headdim), dt[:, None].double(), -torch.exp(A_log.double()),
            B.view(b, 1, ngroups, dstate), C.view(b, 1, ngroups, dstate), D=D.double(), dt_bias=dt_bias.double(),
            initial_states=st_ref, dt_softplus=True, return_final_states=True)
        y = y[:, 0]
        gy_ref = y * F.silu(z.double())
        ss_ref += ((y if norm_before_gate else gy_ref) ** 2).sum(dim=(1, 2))
        assert rel(gy, gy_ref) < 1e-5
        assert rel(ss.cpu(), ss_ref) < 1e-5
        assert rel(state.cpu(), st_ref) < 1e-5


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_state_update_gathers_the_gated_norms_sum_of_squares(norm_before_gate):
    """state_update's folded-norm epilogue (the unfused conv path): y * silu(z) and the row's sum of squares against
    reference.ssd_recurrent in float64; masked headdim rows (12 of a 16-row tile) stay out of the sum."""
    from lit_mamba2.kernels.state_update import state_update

    g = torch.Generator().manual_seed(21)
    b, h, p, n, ngroups = 3, 4, 12, 8, 2
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state0, x, dt, A_log, B, C, D, z, dt_bias = (r(b, h, p, n), r(b, h, p), r(b, h), r(h), r(b, ngroups, n),
                                                 r(b, ngroups, n), r(h), r(b, h, p), r(h))
    state, ss = state0.clone().to(DEVICE), torch.zeros(b, device=DEVICE)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    gy = state_update(state, dev(x), dev(dt), dev(A_log), dev(B), dev(C), D=dev(D), z=dev(z), dt_bias=dev(dt_bias),
                      dt_softplus=True, A_is_log=True, block_p=16, norm_sum_sq=ss,
                      norm_before_gate=norm_before_gate).cpu()
    y, st = reference.ssd_recurrent(x[:, None].double(), dt[:, None].double(), -torch.exp(A_log.double()),
                                    B[:, None].double(), C[:, None].double(), D=D.double(), dt_bias=dt_bias.double(),
                                    initial_states=state0.double(), dt_softplus=True, return_final_states=True)
    y = y[:, 0]
    gy_ref = y * F.silu(z.double())
    assert rel(gy, gy_ref) < 1e-5 and rel(state.cpu(), st) < 1e-5
    assert rel(ss.cpu(), ((y if norm_before_gate else gy_ref) ** 2).sum(dim=(1, 2))) < 1e-5


@pytest.mark.parametrize("dtype,residual_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_add_rmsnorm_applies_and_clears_the_pending_norm(dtype, residual_dtype):
    g = torch.Generator().manual_seed(5)
    b, d, n, eps = 3, 200, 48, 1e-5
    hidden = torch.randn(b, d, generator=g).to(dtype)
    residual = torch.randn(b, d, generator=g).to(residual_dtype)
    ss = torch.rand(b, generator=g) * n * 3 + 0.1
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    ss_dev = ss.clone().to(DEVICE)
    out, r = add_rmsnorm(hidden.to(DEVICE), residual.to(DEVICE), w.to(DEVICE), 1e-5, residual_dtype,
                         pending_norm=(ss_dev, n, eps))
    scaled = (hidden.double() / torch.sqrt(ss.double() / n + eps)[:, None]).to(dtype).double()
    r_ref = scaled + residual.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(r.cpu(), r_ref) < tol
    ref = reference.rmsnorm(r_ref.to(residual_dtype).to(dtype).double(), w.double(), 1e-5)
    assert rel(out.cpu(), ref) < tol
    assert torch.equal(ss_dev.cpu(), torch.zeros(b))


@pytest.mark.parametrize("preset,batch,ring_conv", [("mamba2-test", 2, True), ("mamba2-test", 1, False),
                                                    ("mamba2attn-test", 2, True), ("mamba2attn-test", 2, False)])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_folded_norm_and_pdl_step_equals_pytorch_step(preset, batch, ring_conv, norm_before_gate):
    """Mamba2LMHeadModel.step through Decoder(fold_gated_norm=True, pdl=True) with the Triton kernels against the
    PyTorch step (unfolded, shifted conv) from the same prefilled state, float32 model, over a few tokens. ngroups 1
    (one norm group over the SSM channels: what folding needs); the hybrid preset has attention and MLP blocks after
    folded layers (their add_rmsnorm applies the pending 1/rms)."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.generation import Decoder, pad_prompts
    from lit_mamba2.model import Mamba2LMHeadModel

    torch.manual_seed(0)
    cfg = Mamba2Config.from_name(preset)
    cfg.ssm_cfg = dict(cfg.ssm_cfg, ngroups=1, norm_before_gate=norm_before_gate)
    cfg = Mamba2Config.from_dict(cfg.to_dict())
    model = Mamba2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p))
            if name.endswith("mixer.norm.weight"):  # not all ones, so that folding it into out_proj shows
                p.uniform_(0.5, 1.5)
    prompts = [[5, 6, 7, 8, 9], [10, 11]][:batch]
    ids, seq_idx, lengths, pads = pad_prompts(prompts, "cpu")
    tokens = [torch.tensor([t, t + 1][:batch]) for t in (3, 40, 7)]
    outs = {}
    for impl in ("torch", "triton"):
        with torch.no_grad():
            model.set_impl("torch")  # prefill: the PyTorch chunked path
            opts = (dict(fold_gated_norm=True, pdl=True, ring_conv=ring_conv) if impl == "triton"
                    else dict(ring_conv=False))
            dec = Decoder(model, batch, 12, cuda_graph=False, fuse_linear=False, **opts)
            if impl == "triton":
                n_mamba = sum(type(layer.mixer).__name__ == "Mamba2Mixer" for layer in model.backbone.layers)
                assert dec.folded == n_mamba > 0
            dec.prefill(ids, seq_idx, lengths, pads)
            model.set_impl(impl)
            outs[impl] = [dec.step(t).clone() for t in tokens]
            if impl == "triton":
                assert all(float(st.norm_sum_sq.abs().max()) == 0 for st in dec.states
                           if getattr(st, "norm_sum_sq", None) is not None)
    model.set_impl(None)
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fold_refuses_fused_linears():
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.generation import Decoder
    from lit_mamba2.model import Mamba2LMHeadModel

    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")).eval()
    with pytest.raises(ValueError, match="fold_gated_norm"):
        Decoder(model, 1, 8, cuda_graph=False, fuse_linear=True, fold_gated_norm=True)


@pytest.mark.parametrize("single_pass", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_gemv_with_the_first_weight_chunk_preloaded(batch, single_pass, monkeypatch):
    """The PDL form of the fused GEMVs (first weight chunk loaded before the wait; forced on here, where PDL itself
    is off) against reference.rmsnorm / gated_rmsnorm then a float64 matmul: several chunks and two groups, so the
    preloaded tile must be used exactly once."""
    from lit_mamba2.kernels import decode_linear as dl

    monkeypatch.setattr(dl, "PRELOAD_WEIGHTS", True)
    g = torch.Generator().manual_seed(11 + batch)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    K, N, config = 80, 37, (8, 16, 4, single_pass)  # groups of 40: chunks of 16 with masked tails
    # [residual add + RMSNorm + linear]
    hidden, residual = r(batch, K), r(batch, K)
    nw, W = torch.rand(K, generator=g) + 0.5, r(N, K) / 8
    out, r_new = dl.add_norm_linear(hidden.to(DEVICE), residual.to(DEVICE), nw.to(DEVICE), 1e-5, W.to(DEVICE),
                                    residual_dtype=torch.float32, config=config)
    r_ref = hidden.double() + residual.double()
    ref = reference.rmsnorm(r_ref, nw.double(), 1e-5) @ W.double().T
    assert rel(out.cpu(), ref) < 1e-6 and rel(r_new.cpu(), r_ref) < 1e-6
    # [gated RMSNorm over 2 groups + linear]
    y, z = r(batch, K), r(batch, K)
    out = dl.gated_norm_linear(y.to(DEVICE), z.to(DEVICE), nw.to(DEVICE), 1e-5, 2, False, W.to(DEVICE),
                               config=config)
    ref = reference.gated_rmsnorm(y.double(), z.double(), nw.double(), 1e-5, K // 2, False) @ W.double().T
    assert rel(out.cpu(), ref) < 1e-6


def _nvidia_compiler_available():
    try:
        from triton.backends.nvidia.compiler import CUDAOptions  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        return True
    except ImportError:
        return False


def _compile_pdl_kernels_for_sm90():
    """Compile the decode kernels with USE_PDL=True for sm_90 (Triton's bundled ptxas, no GPU needed) and check each
    PTX waits on the previous grid, then releases the next one. Run in a process without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lit_mamba2.kernels import decode_linear as dl
    from lit_mamba2.kernels import state_update as su

    def compile_ptx(kernel, constexprs, ptr_types=()):
        ptr_types = dict(ptr_types)
        sig = {n: "constexpr" if n in constexprs else "*" + ptr_types.get(n, "bf16") if n.endswith("_ptr")
               else "fp32" if n in ("eps", "dt_min", "dt_max", "scale_eps") else "i32" for n in kernel.arg_names}
        k = triton.compile(ASTSource(kernel, sig, constexprs=dict(constexprs, USE_PDL=True)),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, launch_pdl=True))
        return k.asm["ptx"]

    flags = dict(ADD_RESIDUAL=True, WRITE_RESIDUAL=True, HAS_Z=False, NORM_BEFORE_GATE=False, HAS_BIAS=False,
                 ACCUMULATE=False, SINGLE_PASS=False)
    ptxs = {
        "norm_linear": compile_ptx(dl._norm_linear_kernel, dict(flags, BLOCK_N=4, BLOCK_K=512, PRELOAD=True),
                                   {"r_ptr": "fp32", "r_out_ptr": "fp32"}),
        "mixer_step": compile_ptx(su._mixer_step_kernel, dict(
            WIDTH=4, HAS_CONV_BIAS=True, HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, HAS_LIMIT=False, NORM_SS=True,
            NORM_BEFORE_GATE=False, BLOCK_P=16, BLOCK_N=128), {"ss_ptr": "fp32", "slot_ptr": "i64",
                                                               "A_log_ptr": "fp32"}),
        "state_update": compile_ptx(su._state_update_kernel, dict(
            HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, HAS_LIMIT=False, A_IS_LOG=True, NORM_SS=True,
            NORM_BEFORE_GATE=False, BLOCK_P=64, BLOCK_N=128), {"ss_ptr": "fp32", "A_ptr": "fp32"}),
        "add_rmsnorm": compile_ptx(su._add_rmsnorm_kernel, dict(HAS_RESIDUAL=True, HAS_SCALE=True, BLOCK=1024),
                                   {"ss_ptr": "fp32", "r_ptr": "fp32", "r_out_ptr": "fp32"}),
    }
    for name, ptx in ptxs.items():
        assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx, name
        assert ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch_dependents"), name
    print("compiled:", ", ".join(ptxs))


@pytest.mark.skipif(not _nvidia_compiler_available(), reason="Triton's NVIDIA backend is not installed")
def test_pdl_kernels_compile_for_sm90_with_grid_dependency_control():
    """USE_PDL=True cannot run here, so it is at least compiled for Hopper, in a process without the interpreter."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled: norm_linear, mixer_step, state_update, add_rmsnorm" in done.stdout


if __name__ == "__main__":
    _compile_pdl_kernels_for_sm90()
