"""Decode speed: ms per step and tokens/s at batch 1 and 64 for the mamba2-130m and -370m shapes (random weights,
bf16), ours (Triton kernels, CUDA graph) beside mamba_ssm's `MambaLMHeadModel` with its CUDA-graph decoding
(`generate(cg=True)`), in one run.

    python benchmarks/bench_decode.py --peers .peers --cc-build .peers/causal-conv1d-build --out results.json \
        [--sweep] [--profile] [--drift 512]

Two numbers per row: `step` = one captured decode step replayed (the graph alone: what a token costs once the
prompt is in), and `gen` = a whole `generate` call of --gen-len tokens after a prompt of --prompt-len, divided by
--gen-len (mamba_ssm's benchmark_generation.py measures this one; it includes prefill and sampling).
mamba_ssm is imported from its source folder without its package __init__ (which loads compiled CUDA modules);
--cc-build puts a built causal-conv1d (its `causal_conv1d` package and `causal_conv1d_cuda*.so`) first on the path,
so that mamba_ssm's step uses its CUDA conv update; without it, mamba_ssm falls back to a PyTorch conv update (the
output says which).
--sweep times the kernels' tile choices alone (linear layers with fused norms against cuBLAS, the state update
against a copy of the same bytes); --profile lists the kernels of one eager step; --drift N decodes N tokens greedily
with bf16 and with float32 SSM states and reports where they part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch

SHAPES = {"mamba2-130m": (768, 24), "mamba2-370m": (1024, 48)}
DEVICE = "cuda"
VOCAB = 50288  # mamba2 checkpoints' padded vocabulary


def events_ms(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def median_ms(fn, iters: int, repeats: int = 5) -> float:
    times = sorted(events_ms(fn, iters) for _ in range(repeats))
    return times[len(times) // 2]


def wall_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------------------------
VARIANTS = {  # name: Decoder options (None: the Decoder's default)
    "ours": dict(),
    "ours_fp32_state": dict(state_dtype=torch.float32),
    "ours_ring": dict(ring_conv=True),
    "ours_noring": dict(ring_conv=False),
    "ours_fused_linear": dict(fuse_linear=True),
    "ours_cublas": dict(fuse_linear=False),  # cuBLAS linears, separate norm kernels (the previous step)
    "ours_compiled": dict(fuse_linear=False, compile=True),
    "ours_no_pdl": dict(pdl=False),  # the Triton kernels without programmatic dependent launch
    "ours_no_gnfold": dict(fold_gated_norm=False),  # the gated norm as its own launch (not folded, batch >= 8)
    "ours_no_pipe": dict(row_groups=0),  # batch 64-96: one launch per kernel for the whole batch, no row pipeline
}
# variants that equal the defaults (or make no sense) at a batch size: not timed there
REDUNDANT = {"ours_ring": lambda b: b < 16, "ours_noring": lambda b: b >= 16,  # the ring is the default below 16
             "ours_fused_linear": lambda b: b < 8, "ours_cublas": lambda b: b >= 8,
             "ours_no_gnfold": lambda b: b < 8,  # below 8 the fused GEMVs carry the gated norm (no fold)
             "ours_no_pipe": lambda b: not 64 <= b <= 96}  # the row pipeline's default batch sizes


# ---------------------------------------------------------------------------------------------------------------
# dec1 (batch below 8): variants that patch kernel constants for one run of `ours` (the Decoder's options stay
# the defaults), and --graph-trace: the kernels of captured steps, by device time and by what each adds to the step
DEC1_VARIANTS = {  # name: {"module.ATTRIBUTE": value}, modules of lit_mamba2.kernels
    "dec1_chunked": {"decode_linear.FULL_ROW": False},  # the chunked GEMV (first weight chunk before the wait)
    "dec1_early": {"pdl.EARLY_RELEASE": True},  # GEMVs and mixer release the next kernel at their start
    "dec1_tile2k": {"decode_linear.ROW_TILE": (2048, 4)},
    "dec1_tile8k": {"decode_linear.ROW_TILE": (8192, 4)},
    "dec1_tile8k_w8": {"decode_linear.ROW_TILE": (8192, 8)},
    "dec1_lm4k": {"decode_linear.ROW_TILE_WIDE": (4096, 4)},
    "dec1_lm16k": {"decode_linear.ROW_TILE_WIDE": (16384, 8)},
    "dec1_state1k_w4": {"state_update.STATE_TILE_SMALL_BATCH": (1024, 4)},
    "dec1_state2k_w8": {"state_update.STATE_TILE_SMALL_BATCH": (2048, 8)},
    "dec1_state512_w1": {"state_update.STATE_TILE_SMALL_BATCH": (512, 1)},
    "dec1_early_tile8k": {"pdl.EARLY_RELEASE": True, "decode_linear.ROW_TILE": (8192, 4)},
    "dec1_early_tile2k": {"pdl.EARLY_RELEASE": True, "decode_linear.ROW_TILE": (2048, 4)},
    "dec1_ours_again": {},  # the defaults once more, last: the run's spread
    # call 2 (EARLY_RELEASE on by default since call 1); its dec1_mixer_out* variants (conv + state update inside
    # out_proj's launch) measured slower and were removed with the kernel (notes/decode.md; logs in commit ddfa3f2)
    "dec1_no_early": {"pdl.EARLY_RELEASE": False},
}
VARIANTS.update({k: dict() for k in DEC1_VARIANTS})
REDUNDANT.update({k: (lambda b: b >= 8) for k in DEC1_VARIANTS})

# batch 64: kernel constants patched as in DEC1_VARIANTS, with Decoder options. Runs 8 and 9 also timed, and
# dropped (notes/decode.md; logs in commit c1e219d): an L2 prefetch of the next layer's state after each state
# update, the batch as row groups on their own streams, a state kernel looping over tiles with fewer programs.
BATCH_VARIANTS = {  # name: (Decoder options, {"module.ATTRIBUTE": value})
    "no_evict": (dict(), {"state_update.STATE_EVICT": ""}),  # the state's loads and stores without a hint
    # the conv inside the state kernel (ring) at batch 64, which would save the conv's launch (4.5-5.1 µs per
    # layer): in run 11 (commit 78df6c1) the ring step was +6.7 µs per layer slower than conv +
    # state update with 8192-element tiles (ours_ring), +4.9 µs with 4096 (an eviction hint and early release off
    # changed nothing); smaller tiles (more, shorter programs) not measured yet
    "ring_tile4k": (dict(ring_conv=True), {"state_update.STATE_TILE": (4096, 4)}),
    "ring_tile2k": (dict(ring_conv=True), {"state_update.STATE_TILE": (2048, 4)}),
    "ring_tile2k_w2": (dict(ring_conv=True), {"state_update.STATE_TILE": (2048, 2)}),
    # session 5: the conv kernel's and the state kernel's tiles inside the batch-64 step
    "conv_c128": (dict(), {"state_update.CONV_TILE": (128, 4)}),
    "conv_c1024_w8": (dict(), {"state_update.CONV_TILE": (1024, 8)}),
    "conv_c512_w4": (dict(), {"state_update.CONV_TILE": (512, 4)}),
    "state_8k": (dict(), {"state_update.STATE_TILE": (8192, 4)}),  # the default before decode run 16
    "state_8k_w8": (dict(), {"state_update.STATE_TILE": (8192, 8)}),
    "state_2k": (dict(), {"state_update.STATE_TILE": (2048, 4)}),
    "state_4k_w2": (dict(), {"state_update.STATE_TILE": (4096, 2)}),
    # (run 13's `blocks*` variants, two launches per layer with one persistent kernel from out_proj to the next
    # conv, lost and were removed: notes/decode.md; the code and logs are in commit 63ccabe)
    # session 8: the row-group pipeline (kernels/decode_pipeline.py), its groups and tiles
    "pipe3": (dict(row_groups=3), {}),
    "pipe2": (dict(row_groups=2), {}),
    "pipe1": (dict(row_groups=1), {}),
    "pipe3_in32": (dict(row_groups=3), {"decode_pipeline.IN_TILE": (32, 128)}),
    "pipe3_in128": (dict(row_groups=3), {"decode_pipeline.IN_TILE": (128, 64)}),
    "pipe3_out16": (dict(row_groups=3), {"decode_pipeline.OUT_TILE": (16, 256)}),
    "pipe3_out64": (dict(row_groups=3), {"decode_pipeline.OUT_TILE": (64, 64)}),
    "pipe3_w8": (dict(row_groups=3), {"decode_pipeline.NUM_WARPS": 8}),
    "pipe3_s2": (dict(row_groups=3), {"decode_pipeline.NUM_STAGES": 2}),
    "pipe3_s4": (dict(row_groups=3), {"decode_pipeline.NUM_STAGES": 4}),
    "pipe3_st2k": (dict(row_groups=3), {"state_update.STATE_TILE": (2048, 4)}),
    "pipe3_st8k": (dict(row_groups=3), {"state_update.STATE_TILE": (8192, 4)}),
    "pipe3_t64": (dict(row_groups=3), {"decode_pipeline.IN_TILE": (64, 128), "decode_pipeline.OUT_TILE": (32, 128)}),
    "pipe3_el": (dict(row_groups=3), {"decode_pipeline.WEIGHT_EVICT": "evict_last"}),
    "pipe3_k256": (dict(row_groups=3), {"decode_pipeline.IN_TILE": (32, 256), "decode_pipeline.OUT_TILE": (16, 256)}),
    "pipe3_el_k256": (dict(row_groups=3), {"decode_pipeline.IN_TILE": (32, 256),
                                           "decode_pipeline.OUT_TILE": (16, 256),
                                           "decode_pipeline.WEIGHT_EVICT": "evict_last"}),
    "pipe3_el_o256": (dict(row_groups=3), {"decode_pipeline.OUT_TILE": (16, 256),
                                           "decode_pipeline.WEIGHT_EVICT": "evict_last"}),
    "pipe3_r128": (dict(row_groups=3), {"decode_pipeline.MAXNREG": 128}),
    # session 9: eviction hints inside the pipeline (states evict_first and weights evict_last by default)
    "pipe3_state_nohint": (dict(row_groups=3), {"state_update.STATE_EVICT": ""}),
    "pipe3_nohints": (dict(row_groups=3), {"state_update.STATE_EVICT": "", "decode_pipeline.WEIGHT_EVICT": ""}),
    # session 9: smaller product tiles (less shared memory per program, so more programs per SM), register caps
    **{f"pipe3_i{ik}_o{ok}_s{st}" + (f"_r{r}" if r else ""): (
        dict(row_groups=3), {"decode_pipeline.IN_TILE": (32, ik), "decode_pipeline.OUT_TILE": (16, ok),
                             "decode_pipeline.NUM_STAGES": st, "decode_pipeline.MAXNREG": r})
       for ik, ok, st, r in [(64, 128, 3, None), (64, 128, 3, 96), (64, 128, 3, 80), (64, 128, 4, 80),
                             (128, 128, 3, 96), (64, 256, 3, 96)]},
    # session 9: 8 warps per program with 8192-element state tiles (the same state elements per thread, twice the
    # state bytes in flight per program; the shared-memory cap of 4 programs per SM unchanged)
    "pipe3_w8_st8k": (dict(row_groups=3), {"decode_pipeline.NUM_WARPS": 8, "state_update.STATE_TILE": (8192, 8)}),
    "pipe3_w8_st8k_s2": (dict(row_groups=3), {"decode_pipeline.NUM_WARPS": 8, "decode_pipeline.NUM_STAGES": 2,
                                              "state_update.STATE_TILE": (8192, 8)}),
}
VARIANTS.update({k: v[0] for k, v in BATCH_VARIANTS.items()})
# below batch 16 the ring is the default and its tiles are STATE_TILE_SMALL_BATCH: the ring variants equal ours
REDUNDANT.update({k: (lambda b: b < 16) for k in BATCH_VARIANTS if k.startswith("ring_")})
PATCHES = {**DEC1_VARIANTS, **{k: v[1] for k, v in BATCH_VARIANTS.items()}}


def dec1_set(patches: dict) -> dict:
    """Set lit_mamba2.kernels constants; returns the previous values."""
    import importlib

    before = {}
    for key, value in patches.items():
        mod, attr = key.rsplit(".", 1)
        m = importlib.import_module(f"lit_mamba2.kernels.{mod}")
        before[key] = getattr(m, attr)
        setattr(m, attr, value)
    return before


def ours(name, batch, args, variant):
    before = dec1_set(PATCHES.get(variant, {}))
    try:
        return _ours(name, batch, args, variant)
    finally:
        dec1_set(before)


@torch.inference_mode()
def graph_trace(args, variants):
    """Batch --trace-batch (default 1), each model and variant: 10 captured steps under the CUDA profiler. Per
    kernel (name and grid): calls per step, median device time (with PDL it includes the time spent waiting on the
    kernel before), and median increment of the chain's end (its end minus the previous kernel's end: what it adds
    to the step)."""
    import tempfile
    from statistics import median

    from torch.profiler import ProfilerActivity, profile as tprofile

    from lit_mamba2 import Mamba2Config
    from lit_mamba2.inference import Decoder
    from lit_mamba2.model import Mamba2LMHeadModel

    out = {}
    for name in args.models:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).to(torch.bfloat16).eval()
        batch = args.trace_batch
        prompt = torch.randint(1, 50000, (batch, 8), device=DEVICE)
        for variant in variants:
            before = dec1_set(PATCHES.get(variant, {}))
            try:
                dec = Decoder(model, batch, 64, cuda_graph=True, **VARIANTS[variant])
                dec.prefill(prompt)
                token = torch.randint(1, 50000, (batch,), device=DEVICE)
                plain_ms = median_ms(lambda: dec.step(token), 50)
                n_steps = 10
                with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(n_steps):
                        dec.step(token)
                    torch.cuda.synchronize()
                with tempfile.NamedTemporaryFile(suffix=".json") as f:
                    prof.export_chrome_trace(f.name)
                    events = json.loads(Path(f.name).read_text())["traceEvents"]
            finally:
                dec1_set(before)
            ks = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
            per = len(ks) // n_steps
            stats, spans = {}, []
            for s in range(n_steps):
                step = ks[s * per:(s + 1) * per]
                spans.append(step[-1]["ts"] + step[-1]["dur"] - step[0]["ts"])
                prev_end = step[0]["ts"]
                for e in step:
                    end = e["ts"] + e["dur"]
                    key = f"{e['name'][:40]} grid{tuple(e.get('args', {}).get('grid', ()))}"
                    st = stats.setdefault(key, dict(dur=[], incr=[], n=0))
                    st["dur"].append(e["dur"])
                    st["incr"].append(end - prev_end)
                    st["n"] += 1
                    prev_end = max(prev_end, end)
            rows = sorted(((k, v["n"] // n_steps, median(v["dur"]), median(v["incr"]), sum(v["incr"]) / n_steps)
                           for k, v in stats.items()), key=lambda r: -r[4])
            key = f"{name} b{batch} {variant}"
            out[key] = dict(step_ms_plain=plain_ms, kernels_per_step=per, span_us_median=median(spans),
                            kernels=[dict(kernel=k, per_step=n, dur_us=d, incr_us=i, incr_us_per_step=t)
                                     for k, n, d, i, t in rows])
            print(f"--- {key}: step {plain_ms * 1e3:.1f} us (no profiler), {per} kernels, span under the "
                  f"profiler {median(spans):.1f} us", flush=True)
            for k, n, d, i, t in rows[:12]:
                print(f"  {k:<62} x{n:<3} dur {d:6.2f} incr {i:6.2f} us, {t:7.1f} us/step", flush=True)
            del dec
        del model
        torch.cuda.empty_cache()
    return out


def _ours(name, batch, args, variant):
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.generation import stream
    from lit_mamba2.inference import Decoder
    from lit_mamba2.kernels import pdl
    from lit_mamba2.model import Mamba2LMHeadModel

    opts = VARIANTS[variant]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).to(torch.bfloat16).eval()
    prompt = torch.randint(1, 50000, (batch, args.prompt_len), device="cuda")
    with torch.inference_mode():
        dec = Decoder(model, batch, args.prompt_len + args.gen_len + 8, cuda_graph=True, **opts)
        t0 = time.perf_counter()
        dec.capture()
        capture_s = time.perf_counter() - t0
        dec.prefill(prompt)
        token = torch.randint(1, 50000, (batch,), device="cuda")
        step_ms = median_ms(lambda: dec.step(token), args.iters)

        def gen():
            for _ in stream(model, prompt, args.gen_len, temperature=0, decoder=dec):
                pass

        gen_ms = wall_ms(gen) / args.gen_len if args.gen_for is None or variant in args.gen_for else float("nan")
        # correctness guard: graph steps equal the plain PyTorch steps (states in the same dtype, shifted conv,
        # separate norms, cuBLAS linears) from the same prompt, over 8 tokens
        dec.prefill(prompt)
        eager = Decoder(model, batch, args.prompt_len + 16, cuda_graph=False, ring_conv=False, fuse_linear=False,
                        fold_gated_norm=False, state_dtype=dec.state_dtype, impl="torch")
        eager.prefill(prompt)
        errs = []
        for _ in range(8):
            g = dec.step(token).float()
            e = eager.step(token).float()
            errs.append(((g - e).norm() / e.norm()).item())
            token = e.argmax(-1)
    flags = dict(state_dtype=str(dec.state_dtype).replace("torch.", ""), ring_conv=dec.ring_conv,
                 fuse_linear=dec.fuse_linear, pdl=bool(dec.pdl and pdl.supported()),
                 fold_gated_norm=dec.fold_gated_norm, row_pipeline=dec.row_pipeline is not None)
    del model, dec, eager
    torch.cuda.empty_cache()
    return dict(step_ms=step_ms, gen_ms=gen_ms, capture_s=capture_s, max_rel_err_vs_torch=max(errs), **flags,
                gated_norm="triton", prefill="triton")


# ---------------------------------------------------------------------------------------------------------------
def import_mamba_ssm(peers: Path, cc_build: Path = None):
    """mamba_ssm's modules without its package __init__ (which imports compiled CUDA extensions); a built
    causal-conv1d from cc_build first on the path."""
    cc = "causal_conv1d not given"
    if cc_build is not None:
        sys.path.insert(0, str(cc_build.resolve()))
        try:
            import causal_conv1d
            import causal_conv1d_cuda  # noqa: F401

            cc = f"causal_conv1d {getattr(causal_conv1d, '__version__', '?')} from {cc_build}"
        except Exception as e:  # noqa: BLE001
            cc = f"causal_conv1d not importable from {cc_build}: {type(e).__name__}: {e}"
    print(f"[mamba_ssm] {cc}")
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(peers / "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    try:
        import mamba_ssm.modules.mamba3  # noqa: F401  (imported by mixer_seq_simple; not used here)
    except Exception as e:  # noqa: BLE001
        stub = types.ModuleType("mamba_ssm.modules.mamba3")
        stub.Mamba3 = None
        sys.modules["mamba_ssm.modules.mamba3"] = stub
        print(f"[mamba_ssm] Mamba3 stubbed out ({type(e).__name__}: {e})")
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    import mamba_ssm.modules.mamba2 as m2

    version = getattr(sys.modules["mamba_ssm"], "__version__", None)
    try:
        version = version or Path(peers / "mamba_ssm" / "__init__.py").read_text().split("__version__ = ")[1].split()[0]
    except (OSError, IndexError):
        version = "?"
    conv = (f"mamba_ssm {version}, step with causal_conv1d_update ({cc})"
            if getattr(m2, "causal_conv1d_update", None) is not None else
            f"mamba_ssm {version} WITHOUT causal_conv1d (PyTorch conv fallback; {cc})")
    return MambaConfig, MambaLMHeadModel, conv


def theirs(name, batch, args, MambaConfig, MambaLMHeadModel):
    d_model, n_layer = SHAPES[name]
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277, ssm_cfg={"layer": "Mamba2"},
                      rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16)
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()
    prompt = torch.randint(1, 50000, (batch, args.prompt_len), device="cuda")
    max_length = args.prompt_len + args.gen_len

    def gen():
        model.generate(input_ids=prompt, max_length=max_length, cg=True, top_k=1, eos_token_id=None)

    t0 = time.perf_counter()
    gen()  # captures the graph (cached on the model for this batch and max_length)
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - t0
    gen_ms = wall_ms(gen) / args.gen_len  # generate() counts the prefill's token among max_length
    cache = model._decoding_cache
    token = torch.randint(1, 50000, (batch, 1), device="cuda")
    positions = torch.full((batch, 1), args.prompt_len, device="cuda", dtype=torch.long)
    with torch.inference_mode():
        step_ms = median_ms(lambda: cache.run(token, positions, args.prompt_len), args.iters)
    del model, cache
    torch.cuda.empty_cache()
    return dict(step_ms=step_ms, gen_ms=gen_ms, capture_s=capture_s)


# ---------------------------------------------------------------------------------------------------------------
def graph_ms(fn, reps: int = 20, iters: int = 20) -> float:
    """fn's device time: `reps` calls captured in one CUDA graph, replayed; ms per call (launch gaps as in a
    decode graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return median_ms(graph.replay, iters) / reps


# (BLOCK_N, BLOCK_K, num_warps, single_pass) and (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, single_pass)
LINEAR_CONFIGS = [(4, 512, 4, False), (4, 512, 4, True), (8, 256, 4, False), (8, 256, 4, True), (2, 512, 2, True),
                  (16, 256, 4, True)]
DOT_CONFIGS = [(64, 32, 128, 4, 3, False), (16, 32, 128, 4, 3, True), (16, 64, 128, 4, 3, True),
               (32, 64, 64, 4, 3, True), (16, 128, 64, 4, 3, True), (64, 64, 128, 4, 3, True)]
STATE_TILES = [(16, 4), (32, 4), (64, 4), (32, 8), (64, 8), (16, 2)]  # (block_p, num_warps)


@torch.inference_mode()
def sweep(args, out: list, save):
    """Each decode kernel alone (graph-replayed), per tile choice; the linear layers against the unfused
    kernels + cuBLAS that they replace, the state update against copying the same bytes."""
    import torch.nn.functional as F

    from lit_mamba2.kernels import decode_linear as dl
    from lit_mamba2.kernels.rmsnorm_gated import gated_rmsnorm
    from lit_mamba2.kernels.state_update import add_rmsnorm, mixer_step, state_update

    dev, bf = DEVICE, torch.bfloat16
    for name in args.models[:1]:
        d, _ = SHAPES[name]
        di, n, hd = 2 * d, 128, 64
        h = di // hd
        conv_dim = di + 2 * n
        shapes = dict(in_proj=(2 * di + 2 * n + h, d), out_proj=(d, di), lm_head=(VOCAB, d))
        for batch in args.batches:
            for lname, (N, K) in shapes.items():
                W = torch.randn(N, K, device=dev, dtype=bf) / K ** 0.5
                nw = torch.rand(K, device=dev, dtype=bf) + 0.5
                hid, res = torch.randn(batch, K, device=dev, dtype=bf), torch.randn(batch, K, device=dev)
                z = torch.randn(batch, K, device=dev, dtype=bf)
                acc = torch.randn(batch, N, device=dev)
                if lname == "out_proj":
                    base = lambda: acc.add_(F.linear(gated_rmsnorm(hid, z, nw, 1e-5, K, False), W))  # noqa: E731
                    fused = lambda c: dl.gated_norm_linear(hid, z, nw, 1e-5, 1, False, W, residual=acc,  # noqa: E731
                                                           config=c)
                elif lname == "in_proj":
                    base = lambda: F.linear(add_rmsnorm(hid, res, nw, 1e-5, torch.float32)[0], W)  # noqa: E731
                    fused = lambda c: dl.add_norm_linear(hid, res, nw, 1e-5, W, None, torch.float32,  # noqa: E731
                                                         config=c)
                else:
                    base = lambda: F.linear(add_rmsnorm(res, None, nw, 1e-5, torch.float32)[0], W)  # noqa: E731
                    fused = lambda c: dl.add_norm_linear(None, res, nw, 1e-5, W, config=c)  # noqa: E731
                row = dict(kind="linear", model=name, batch=batch, layer=lname, N=N, K=K,
                           cublas_linear_alone_ms=graph_ms(lambda: F.linear(hid, W)),
                           unfused_ms=graph_ms(base), weight_GBps_floor_ms=W.numel() * 2 / 2.97e9 * 1e3)
                configs = LINEAR_CONFIGS if batch < dl.GEMV_BELOW else DOT_CONFIGS
                for c in configs:
                    try:
                        row[str(c)] = graph_ms(lambda: fused(c))
                    except Exception as e:  # noqa: BLE001
                        row[str(c)] = f"{type(e).__name__}: {str(e)[:120]}"
                out.append(row)
                save()
                print(row, flush=True)
            # the SSM state update (bf16 and float32 states), fused with the ring conv or alone
            for sdt in (torch.bfloat16, torch.float32):
                # several states in turn, together larger than the L2 cache (50 MB on an H100), as a step's 24+
                # layers are: a single state would stay in L2 between calls and flatter the kernel
                n_bufs = max(1, min(8, int(120e6 // (batch * h * hd * n * torch.finfo(sdt).bits // 8)) or 1))
                states = [torch.randn(batch, h, hd, n, device=dev).to(sdt) for _ in range(n_bufs)]
                turn = [0]

                def next_state():
                    turn[0] = (turn[0] + 1) % n_bufs
                    return states[turn[0]]

                state = states[0]
                ring = torch.randn(batch, 4, conv_dim, device=dev, dtype=bf).transpose(1, 2)
                slot = torch.tensor(3, device=dev)
                xBC = torch.randn(batch, conv_dim, device=dev, dtype=bf)
                cw, cb = torch.randn(conv_dim, 4, device=dev, dtype=bf) / 2, torch.randn(conv_dim, device=dev, dtype=bf)
                dt, A_log = torch.randn(batch, h, device=dev, dtype=bf), torch.rand(h, device=dev)
                Dp, dtb = torch.ones(h, device=dev), torch.randn(h, device=dev)
                x = xBC[:, :di].view(batch, h, hd)
                B, C = xBC[:, di:di + n].view(batch, 1, n), xBC[:, di + n:].view(batch, 1, n)
                nbytes = 2 * state.numel() * state.element_size()
                row = dict(kind="state", model=name, batch=batch, state_dtype=str(sdt).replace("torch.", ""),
                           state_MB=state.numel() * state.element_size() / 1e6,
                           n_state_buffers=n_bufs,
                           copy_ms=graph_ms(lambda: next_state().copy_(states[(turn[0] + 1) % n_bufs])))
                for bp, nw_ in STATE_TILES:
                    for kname, fn in (
                            ("mixer_step", lambda: mixer_step(next_state(), ring, slot, xBC, cw, cb, dt, A_log,
                                                              D=Dp, dt_bias=dtb, block_p=bp, num_warps=nw_)),
                            ("state_update", lambda: state_update(next_state(), x, dt, A_log, B, C, D=Dp,
                                                                  dt_bias=dtb, dt_softplus=True, A_is_log=True,
                                                                  block_p=bp, num_warps=nw_))):
                        try:
                            row[f"{kname}{(bp, nw_)}"] = graph_ms(fn)
                        except Exception as e:  # noqa: BLE001
                            row[f"{kname}{(bp, nw_)}"] = f"{type(e).__name__}: {str(e)[:120]}"
                row["state_bytes_GB_per_s_at_copy"] = nbytes / row["copy_ms"] / 1e6
                out.append(row)
                save()
                print(row, flush=True)


def apply_tuned(path: Path) -> dict:
    """Set the kernels' tile constants to a sweep's winners (the linear tiles by the time of a whole step's
    layers: n_layer x (in_proj + out_proj) + lm_head; the state tiles by mixer_step + state_update in bf16)."""
    from lit_mamba2.kernels import decode_linear as dl
    from lit_mamba2.kernels import state_update as su

    rows = json.loads(path.read_text()).get("sweep") or []
    chosen = {}

    def best(candidates, rs, cost_of):
        costs = {c: cost_of(c, rs) for c in candidates}
        costs = {c: v for c, v in costs.items() if v < float("inf")}
        return min(costs, key=costs.get) if costs else None

    def linear_cost(c, rs):
        n_layer = SHAPES[rs[0]["model"]][1]
        weight = {"in_proj": n_layer, "out_proj": n_layer, "lm_head": 1}
        vals = [r.get(str(c)) for r in rs]
        if any(not isinstance(v, float) for v in vals):
            return float("inf")
        return sum(weight[r["layer"]] * v for r, v in zip(rs, vals))

    for attr, small, layers, configs in (("CONFIG", True, ("in_proj", "out_proj"), LINEAR_CONFIGS),
                                         ("CONFIG_WIDE", True, ("lm_head",), LINEAR_CONFIGS),
                                         ("DOT_CONFIG", False, ("in_proj", "out_proj", "lm_head"), DOT_CONFIGS)):
        rs = [r for r in rows if r.get("kind") == "linear" and (r["batch"] < dl.GEMV_BELOW) == small and
              r["layer"] in layers]
        c = best(configs, rs, linear_cost) if rs else None
        if c is not None:
            setattr(dl, attr, tuple(c))
            chosen[attr] = c

    def state_cost(c, rs):
        vals = [r.get(f"{k}{c}") for r in rs for k in ("mixer_step", "state_update")]
        if any(not isinstance(v, float) for v in vals):
            return float("inf")
        return sum(vals)

    for attr, small in (("STATE_TILE_SMALL_BATCH", True), ("STATE_TILE", False)):
        rs = [r for r in rows if r.get("kind") == "state" and r["state_dtype"] == "bfloat16" and
              (r["batch"] < 16) == small]
        c = best(STATE_TILES, rs, state_cost) if rs else None
        if c is not None:
            setattr(su, attr, (c[0] * 128, c[1]))  # block_p rows of dstate 128
            chosen[attr] = (c[0] * 128, c[1])
    print(f"[tuned] from {path}: {chosen}", flush=True)
    return chosen


@torch.inference_mode()
def profile(args):
    """The kernels of one eager decode step (the Decoder's defaults), by device time."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    from lit_mamba2 import Mamba2Config
    from lit_mamba2.inference import Decoder
    from lit_mamba2.model import Mamba2LMHeadModel

    tables = {}
    for name in args.models[:1]:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).to(torch.bfloat16).eval()
        for batch in args.batches:
            for opts in (dict(), dict(fuse_linear=False, ring_conv=False)):
                dec = Decoder(model, batch, 64, cuda_graph=False, **opts)
                dec.prefill(torch.randint(1, model.config.vocab_size, (batch, 8), device=DEVICE))
                token = torch.randint(1, model.config.vocab_size, (batch,), device=DEVICE)
                for _ in range(3):
                    dec.step(token)
                torch.cuda.synchronize()
                with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        dec.step(token)
                    torch.cuda.synchronize()
                key = f"{name} batch {batch} {opts or 'defaults'}"
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
                tables[key] = table
                print(f"--- {key}: kernels of 5 eager steps\n{table}", flush=True)
        del model
    return tables


@torch.inference_mode()
def drift(args, n_tokens: int):
    """bf16 against float32 SSM states, greedy, same prompts: free-running (first token where they part) and
    teacher-forced on the float32 run's tokens (logit differences and argmax agreement per window)."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.generation import stream
    from lit_mamba2.inference import Decoder
    from lit_mamba2.model import Mamba2LMHeadModel

    res = []
    for name in args.models:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).to(torch.bfloat16).eval()
        batch = 4
        prompt = torch.randint(1, model.config.vocab_size, (batch, args.prompt_len), device=DEVICE)
        decs = {k: Decoder(model, batch, args.prompt_len + n_tokens + 2, state_dtype=dt)
                for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        toks = {k: torch.stack(list(stream(model, prompt, n_tokens, temperature=0, decoder=d)), 1)
                for k, d in decs.items()}
        same = toks["fp32"] == toks["bf16"]
        first = [int((~row).nonzero()[0]) if (~row).any() else None for row in same]
        # teacher forcing: both decoders fed the float32 run's tokens
        l32, l16 = decs["fp32"].prefill(prompt).float(), decs["bf16"].prefill(prompt).float()
        diffs, agree, scale = [], [], []
        for t in range(n_tokens - 1):
            diffs.append((l32 - l16).abs().max().item())
            agree.append((l32.argmax(-1) == l16.argmax(-1)).float().mean().item())
            scale.append(l32.abs().max().item())
            tok = toks["fp32"][:, t]
            l32, l16 = decs["fp32"].step(tok).float().clone(), decs["bf16"].step(tok).float()
        w = 64
        windows = [dict(tokens=f"{i}-{min(i + w, len(diffs)) - 1}", max_abs_logit_diff=max(diffs[i:i + w]),
                        max_abs_logit=max(scale[i:i + w]), argmax_agreement=sum(agree[i:i + w]) / len(agree[i:i + w]))
                   for i in range(0, len(diffs), w)]
        row = dict(model=name, batch=batch, tokens=n_tokens, first_divergent_token_per_row=first,
                   free_running_token_agreement=same.float().mean().item(), teacher_forced=windows)
        print(row, flush=True)
        res.append(row)
        del model, decs
        torch.cuda.empty_cache()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=Path, default=Path(".peers"), help="folder holding mamba_ssm's source")
    p.add_argument("--models", nargs="+", default=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--gen-for", nargs="*", default=None,
                   help="time whole generations only for these variants (default: all; saves time per call)")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=["ours", "ours_fp32_state",
                                                                              "ours_cublas"],
                   help="ours: the Decoder's defaults (states in the model's dtype, linears with fused norms "
                        "below batch 8, ring conv below batch 16, programmatic dependent launch); ours_fp32_state: "
                        "float32 SSM states; "
                        "ours_ring / ours_noring: the conv fused into the state kernel or not; ours_fused_linear / "
                        "ours_cublas: the linears with fused norms (Triton), or cuBLAS linears and separate norm "
                        "kernels; ours_compiled: the step through torch.compile (slow to start); ours_no_pdl: "
                        "the Triton kernels launched without programmatic dependent launch; ours_no_gnfold: the gated norm as "
                        "its own kernel instead of folded into the state kernel and the next add+norm")
    p.add_argument("--cc-build", type=Path, default=None,
                   help="folder holding a built causal-conv1d (causal_conv1d/ and causal_conv1d_cuda*.so)")
    p.add_argument("--no-mamba-ssm", action="store_true")
    p.add_argument("--only-mamba-ssm", action="store_true", help="time mamba_ssm alone (no variant of ours)")
    p.add_argument("--tuned", type=Path, default=None, help="a --sweep's .extras.json: use its winning tiles")
    p.add_argument("--sweep", action="store_true", help="time the kernels' tile choices alone first")
    p.add_argument("--profile", action="store_true", help="list the kernels of one eager step")
    p.add_argument("--graph-trace", nargs="*", default=None, choices=list(VARIANTS),
                   help="the kernels of captured steps of these variants under the CUDA profiler")
    p.add_argument("--trace-batch", type=int, default=1, help="--graph-trace's batch size")
    p.add_argument("--drift", type=int, default=0, help="tokens of bf16- vs float32-state greedy decoding")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--report", type=Path, nargs="+", default=None,
                   help="only print one table from these JSON outputs (e.g. bench.json mamba.json)")
    args = p.parse_args()
    if args.report:
        return report(args.report)

    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}, {torch.cuda.get_device_name()}")
    extras = {}

    def save_extras():
        if args.out:
            args.out.with_suffix(".extras.json").write_text(json.dumps(extras, indent=2, default=str))

    def stage(name, run, error_key=None):
        """run() -> extras[name]; a failure is recorded (under error_key, or in place of the result) and the
        later stages still run."""
        t0 = time.perf_counter()
        try:
            result = run()
            if result is not None:
                extras[name] = result
        except Exception as e:  # noqa: BLE001 - one failing stage must not lose the others' numbers
            extras[error_key or name] = f"{type(e).__name__}: {e}"
            print(f"[{name}] failed: {extras[error_key or name]}")
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
        save_extras()

    if args.sweep:
        extras["sweep"] = []  # filled row by row, so that a failure keeps the rows timed before it
        stage("sweep", lambda: sweep(args, extras["sweep"], save_extras), error_key="sweep_error")
    if args.drift:
        stage("drift", lambda: drift(args, args.drift))
    if args.profile:
        stage("profile", lambda: profile(args))
    if args.graph_trace:
        stage("graph_trace", lambda: graph_trace(args, args.graph_trace))
    tuned = apply_tuned(args.tuned) if args.tuned and args.tuned.exists() else {}
    if not args.variants and not args.only_mamba_ssm:
        return
    try:
        if args.no_mamba_ssm:
            raise RuntimeError("skipped (--no-mamba-ssm)")
        MambaConfig, MambaLMHeadModel, conv = import_mamba_ssm(args.peers, args.cc_build)
        print(f"[mamba_ssm] imported from {args.peers}, {conv}")
    except Exception as e:  # noqa: BLE001
        MambaConfig = MambaLMHeadModel = None
        conv = f"not importable: {type(e).__name__}: {e}"
        print(f"[mamba_ssm] {conv}")
    variants = [] if args.only_mamba_ssm else args.variants
    rows = {(name, batch): dict(model=name, batch=batch) for name in args.models for batch in args.batches}

    def save():
        if args.out:
            args.out.write_text(json.dumps(dict(
                device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
                mamba_ssm_conv=conv, tuned=tuned, args={k: str(v) for k, v in vars(args).items()},
                rows=list(rows.values())),
                indent=2))

    def time_mamba_ssm(name, batch, row):
        try:
            row["mamba_ssm"] = theirs(name, batch, args, MambaConfig, MambaLMHeadModel)
        except Exception as e:  # noqa: BLE001
            row["mamba_ssm"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        print(name, batch, "mamba_ssm", row["mamba_ssm"], flush=True)

    if args.only_mamba_ssm and MambaLMHeadModel is not None:
        for (name, batch), row in rows.items():
            time_mamba_ssm(name, batch, row)
            save()
    # compiled variants last: their compile time is the least predictable, and the rest is saved first
    for i, variant in enumerate(variants):
        for (name, batch), row in rows.items():
            if variant in REDUNDANT and REDUNDANT[variant](batch):
                continue  # the default at this batch size already
            try:
                row[variant] = ours(name, batch, args, variant)
            except Exception as e:  # noqa: BLE001
                row[variant] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            print(name, batch, variant, row[variant], flush=True)
            if i == 0 and MambaLMHeadModel is not None and not args.no_mamba_ssm:
                time_mamba_ssm(name, batch, row)
            save()
    print_table(list(rows.values()), variants, conv, args.gen_len, args.prompt_len)


def print_table(rows, variants, conv, gen_len, prompt_len):
    def fmt(r, key):
        v = r.get(key)
        if not v or "error" in v:
            return f"{'-' if not v else 'error':>15}"
        return f"{v['step_ms']:7.3f} {v['gen_ms']:7.3f}"

    cols = list(variants) + ["mamba_ssm"]
    print(f"\nms per decode step / per generated token (step = captured step replayed; gen = generate() of "
          f"{gen_len} tokens after {prompt_len}, per token; nan: not timed). mamba_ssm: {conv}")
    print(f"{'model':<12} {'batch':>5} | " + " | ".join(f"{c:^15}" for c in cols) + " | step ours/mamba_ssm")
    for r in rows:
        ratio = float("nan")
        if "error" not in r.get("ours", {"error": 1}) and "error" not in r.get("mamba_ssm", {"error": 1}):
            ratio = r["ours"]["step_ms"] / r["mamba_ssm"]["step_ms"]
        # the fastest variant with states in the model's dtype (float32 states are a different trade)
        timed = {v: r[v]["step_ms"] for v in variants if v in r and "error" not in r[v]
                 and r[v].get("state_dtype") != "float32"}
        best = min(timed, key=timed.get) if timed else None
        best_txt = f" | best {best} {timed[best]:.3f}" if best else ""
        if best and "error" not in r.get("mamba_ssm", {"error": 1}):
            best_txt += f" ({timed[best] / r['mamba_ssm']['step_ms']:.2f} of mamba_ssm)"
        print(f"{r['model']:<12} {r['batch']:>5} | " + " | ".join(fmt(r, c) for c in cols) + f" | {ratio:.2f}"
              + best_txt)


def report(paths):
    """One table from several runs' JSON (e.g. the ours stage's bench.json and the mamba stage's mamba.json)."""
    rows, variants, conv, gen_len, prompt_len = {}, [], "not measured", "?", "?"
    for path in paths:
        if not path.exists():
            print(f"[report] {path} missing")
            continue
        data = json.loads(path.read_text())
        if "not importable" not in data.get("mamba_ssm_conv", "") and "skipped" not in data.get("mamba_ssm_conv", ""):
            conv = data.get("mamba_ssm_conv", conv)
        gen_len, prompt_len = data["args"].get("gen_len", gen_len), data["args"].get("prompt_len", prompt_len)
        for r in data["rows"]:
            row = rows.setdefault((r["model"], r["batch"]), dict(model=r["model"], batch=r["batch"]))
            for k, v in r.items():
                if k not in ("model", "batch") and (k not in row or "error" in row[k]):
                    row[k] = v
                    if k.startswith("ours") and k not in variants:
                        variants.append(k)
    print_table(list(rows.values()), variants, conv, gen_len, prompt_len)

if __name__ == "__main__":
    main()
