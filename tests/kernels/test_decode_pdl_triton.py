"""Programmatic dependent launch (kernels/pdl.py) for the decode kernels, under TRITON_INTERPRET=1: PDL must be a
no-op where it is unsupported (here: the interpreter), the decode step with it on must equal the PyTorch step, the
GEMVs' PDL form (first weight chunk loaded before the wait) is checked against independent references, and the
USE_PDL kernels are compiled for sm_90 (no GPU needed) with their PTX checked for the grid-dependency control."""

import os

# (first: it sets TRITON_INTERPRET)
from kernel_testing import DEVICE, INTERPRETED, needs_interpreter_or_cuda, rel, spread_decays

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lit_mamba2 import reference  # noqa: E402
from lit_mamba2.kernels import pdl  # noqa: E402

pytestmark = needs_interpreter_or_cuda


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter")
def test_pdl_is_off_under_the_interpreter():
    assert not pdl.supported()
    with pdl.launching() as on:
        assert on is False and pdl.options() == dict(USE_PDL=False)
    assert pdl.options() == dict(USE_PDL=False)


def test_early_release_only_for_kernels_that_opt_in(monkeypatch):
    """USE_PDL: 0 off, 1 release after the wait, 2 release at the start (options(early=True) with EARLY_RELEASE)."""
    monkeypatch.setattr(pdl, "_enabled", True)  # as within pdl.launching() on a GPU that supports it
    monkeypatch.setattr(pdl, "EARLY_RELEASE", True)
    assert pdl.options() == dict(USE_PDL=1, launch_pdl=True)
    assert pdl.options(early=True) == dict(USE_PDL=2, launch_pdl=True)
    monkeypatch.setattr(pdl, "EARLY_RELEASE", False)
    assert pdl.options(early=True) == dict(USE_PDL=1, launch_pdl=True)
    monkeypatch.setattr(pdl, "_enabled", False)
    assert pdl.options(early=True) == dict(USE_PDL=0)


@pytest.mark.parametrize("preset,batch,ring_conv,fuse_linear", [
    ("mamba2-test", 2, True, False), ("mamba2-test", 1, False, True),
    ("mamba2attn-test", 2, True, False), ("mamba2attn-test", 1, False, False)])
def test_pdl_step_equals_pytorch_step(preset, batch, ring_conv, fuse_linear):
    """The decode step through Decoder(pdl=True) (the default) with the Triton kernels against the PyTorch
    step (shifted conv, cuBLAS-style linears) from the same prefilled state, float32 model, over a few tokens."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.generation import pad_prompts
    from lit_mamba2.inference import Decoder
    from lit_mamba2.model import Mamba2LMHeadModel

    torch.manual_seed(0)
    model = spread_decays(Mamba2LMHeadModel(Mamba2Config.from_name(preset)).eval().to(DEVICE))
    prompts = [[5, 6, 7, 8, 9], [10, 11]][:batch]
    ids, seq_idx, lengths, pads = pad_prompts(prompts, DEVICE)
    tokens = [torch.tensor([t, t + 1][:batch], device=DEVICE) for t in (3, 40, 7)]
    outs = {}
    for impl in ("torch", "triton"):
        with torch.no_grad():
            model.set_impl("torch")  # prefill: the PyTorch chunked path
            opts = (dict(ring_conv=ring_conv, fuse_linear=fuse_linear) if impl == "triton"
                    else dict(ring_conv=False, fuse_linear=False, pdl=False))
            dec = Decoder(model, batch, 12, cuda_graph=False, impl=impl, **opts)
            assert dec.pdl is (impl == "triton")
            dec.prefill(ids, seq_idx, lengths, pads)
            outs[impl] = [dec.step(t).clone() for t in tokens]
    model.set_impl(None)
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generate_verb_passes_pdl_false_to_the_decoder(tmp_path, monkeypatch, capsys):
    from lit_mamba2 import Mamba2Config, generation
    from lit_mamba2.model import Mamba2LMHeadModel

    seen = []

    class Spy(generation.Decoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.pdl)

    torch.manual_seed(0)
    Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")).save_pretrained(tmp_path, format="mamba_ssm")
    monkeypatch.setattr(generation, "Decoder", Spy)
    from lit_mamba2.cli import main

    argv = ["generate", "--checkpoint", str(tmp_path), "--tokenizer", "byte", "--prompt", "ab", "--max_new_tokens",
            "2", "--temperature", "0", "--device", "cpu"]
    assert main(argv) == 0
    assert main(argv + ["--pdl", "false"]) == 0
    assert seen == [True, False]


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

    def compile_ptx(kernel, constexprs, ptr_types=(), use_pdl=True):
        ptr_types = dict(ptr_types)
        sig = {n: "constexpr" if n in constexprs else "*" + ptr_types.get(n, "bf16") if n.endswith("_ptr")
               else "fp32" if n in ("eps", "dt_min", "dt_max", "inv_h_dim", "h_eps", "norm_eps", "gnorm_eps",
                                    "inv_d_model", "inv_d_ssm") else "i32" for n in kernel.arg_names}
        k = triton.compile(ASTSource(kernel, sig, constexprs=dict(constexprs, USE_PDL=use_pdl)),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, launch_pdl=True))
        return k.asm["ptx"]

    flags = dict(ADD_RESIDUAL=True, WRITE_RESIDUAL=True, HAS_Z=False, NORM_BEFORE_GATE=False, HAS_BIAS=False,
                 ACCUMULATE=False, SINGLE_PASS=False)
    ptxs = {
        "norm_linear": compile_ptx(dl._norm_linear_kernel, dict(flags, BLOCK_N=4, BLOCK_K=512, PRELOAD=True),
                                   {"r_ptr": "fp32", "r_out_ptr": "fp32"}),
        "norm_gemv": compile_ptx(dl._norm_gemv_kernel, dict({k: v for k, v in flags.items() if k != "SINGLE_PASS"},
                                                            NGROUPS=1, BLOCK_N=4, BLOCK_K=1024),
                                 {"r_ptr": "fp32", "r_out_ptr": "fp32"}),
        "mixer_step": compile_ptx(su._mixer_step_kernel, dict(
            WIDTH=4, HAS_CONV_BIAS=True, HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, HAS_LIMIT=False, FOLD_NORM=False,
            BLOCK_P=16, BLOCK_N=128), {"slot_ptr": "i64", "A_log_ptr": "fp32"}),
        "state_update": compile_ptx(su._state_update_kernel, dict(
            HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, HAS_LIMIT=False, A_IS_LOG=True,
            FOLD_NORM=True, BLOCK_P=64, BLOCK_N=128, EVICT="evict_first"), {"A_ptr": "fp32", "ss_ptr": "fp32"}),
        "conv_step": compile_ptx(su._conv_step_kernel, dict(WIDTH=4, HAS_BIAS=True, SILU=True, BLOCK_C=256)),
        "add_rmsnorm": compile_ptx(su._add_rmsnorm_kernel, dict(HAS_RESIDUAL=True, HAS_RMS=True, BLOCK=1024,
                                                                 BLOCK_PART=32),
                                   {"r_ptr": "fp32", "r_out_ptr": "fp32", "ss_ptr": "fp32"}),
    }
    for name, ptx in ptxs.items():
        assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx, name
        assert ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch_dependents"), name
    # early release (USE_PDL=2, pdl.EARLY_RELEASE): the kernels that opt in release first, then wait, once each
    early = {
        "norm_gemv": compile_ptx(dl._norm_gemv_kernel, dict({k: v for k, v in flags.items() if k != "SINGLE_PASS"},
                                                            NGROUPS=1, BLOCK_N=4, BLOCK_K=1024),
                                 {"r_ptr": "fp32", "r_out_ptr": "fp32"}, use_pdl=2),
        "mixer_step": compile_ptx(su._mixer_step_kernel, dict(
            WIDTH=4, HAS_CONV_BIAS=True, HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, HAS_LIMIT=False, FOLD_NORM=True,
            BLOCK_P=16, BLOCK_N=128), {"slot_ptr": "i64", "A_log_ptr": "fp32", "ss_ptr": "fp32"},
            use_pdl=2),
    }
    for name, ptx in early.items():
        assert ptx.count("griddepcontrol.launch_dependents") == 1 and ptx.count("griddepcontrol.wait") == 1, name
        assert ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait"), name
    # the row pipeline's launch: released at its start, then one wait in each role's branch
    from lit_mamba2.kernels import decode_pipeline as dp

    ptx = compile_ptx(dp._pipeline_kernel, dict(
        HAS_IN_BIAS=False, WIDTH=4, HAS_CONV_BIAS=True, HAS_DT_BIAS=True, HAS_LIMIT=False, BLOCK_M=32, IN_N=32,
        IN_K=128, OUT_N=16, OUT_K=256, BLOCK_PART=64, BLOCK_GPART=64, BLOCK_P=32, BLOCK_N=128, EVICT="evict_first",
        W_EVICT="evict_last", DOT_F32=False), {n: "fp32" for n in ("res_ptr", "ssr_ptr", "ssg_ptr", "A_log_ptr",
                                                                   "D_ptr", "dtb_ptr")} | {"slot_ptr": "i64"},
        use_pdl=2)
    assert ptx.count("griddepcontrol.launch_dependents") == 1 and ptx.count("griddepcontrol.wait") == 3
    assert ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait")
    print("compiled:", ", ".join(ptxs))


@pytest.mark.skipif(not _nvidia_compiler_available(), reason="Triton's NVIDIA backend is not installed")
def test_pdl_kernels_compile_for_sm90_with_grid_dependency_control():
    """USE_PDL=True cannot run here, so it is at least compiled for Hopper, in a process without the interpreter."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled: norm_linear, norm_gemv, mixer_step, state_update, conv_step, add_rmsnorm" in done.stdout


if __name__ == "__main__":
    _compile_pdl_kernels_for_sm90()
