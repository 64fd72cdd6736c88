"""Decode speed: ms per step and tokens/s at batch 1 and 64 for the mamba2-130m and -370m shapes (random weights,
bf16), ours (Triton state-update kernels, CUDA graph, optionally torch.compile) beside mamba_ssm's
`MambaLMHeadModel` with its CUDA-graph decoding (`generate(cg=True)`), in one run.

    python benchmarks/bench_decode.py --peers .peers --out results.json

Two numbers per row: `step` = one captured decode step replayed (the graph alone: what a token costs once the
prompt is in), and `gen` = a whole `generate` call of --gen-len tokens after a prompt of --prompt-len, divided by
--gen-len (mamba_ssm's benchmark_generation.py measures this one; it includes prefill and sampling).
mamba_ssm is imported from its source folder without its package __init__ (which loads compiled CUDA modules);
without causal_conv1d built its Mamba2 step falls back to a PyTorch conv update (said in the output).
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
VARIANTS = {  # name: Decoder options
    "ours": dict(state_dtype=torch.float32, ring_conv=True, compile=False),
    "ours_bf16_state": dict(state_dtype=torch.bfloat16, ring_conv=True, compile=False),
    "ours_unfused": dict(state_dtype=torch.float32, ring_conv=False, compile=False),
    "ours_compiled": dict(state_dtype=torch.float32, ring_conv=True, compile=True),
}


def ours(name, batch, args, variant):
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.generation import Decoder, stream
    from lit_mamba2.model import GatedRMSNorm, Mamba2LMHeadModel

    opts = VARIANTS[variant]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).to(torch.bfloat16).eval()
    # Ops whose kernels other parts of the project provide may be absent in this tree: use PyTorch for those.
    have = {k: importlib.util.find_spec(f"lit_mamba2.kernels.{k}") is not None for k in ("ssd", "conv1d",
                                                                                       "rmsnorm_gated")}
    prefill_impl = None if have["ssd"] and have["conv1d"] else "torch"
    norm_impl = None if have["rmsnorm_gated"] else "torch"
    prompt = torch.randint(1, 50000, (batch, args.prompt_len), device="cuda")

    def use(impl, norm):
        model.set_impl(impl)
        for m in model.modules():
            if isinstance(m, GatedRMSNorm):
                m.impl = norm

    with torch.inference_mode():
        dec = Decoder(model, batch, args.prompt_len + args.gen_len + 8, cuda_graph=True, **opts)
        use(None, norm_impl)  # the step: Triton kernels (fixed in the graph once captured)
        t0 = time.perf_counter()
        try:
            dec.capture()
        except Exception as e:  # noqa: BLE001 - another part's kernel failing must not hide ours
            print(f"  [{variant}] capture with gated norm impl={norm_impl} failed ({type(e).__name__}: {e}); "
                  "retrying with the PyTorch gated norm")
            norm_impl = "torch"
            dec = Decoder(model, batch, args.prompt_len + args.gen_len + 8, cuda_graph=True, **opts)
            use(None, norm_impl)
            dec.capture()
        capture_s = time.perf_counter() - t0
        use(prefill_impl, norm_impl)
        try:
            dec.prefill(prompt)
        except Exception as e:  # noqa: BLE001
            print(f"  [{variant}] prefill with impl={prefill_impl} failed ({type(e).__name__}: {e}); using PyTorch")
            prefill_impl = "torch"
            use(prefill_impl, norm_impl)
            dec.prefill(prompt)
        token = torch.randint(1, 50000, (batch,), device="cuda")
        step_ms = median_ms(lambda: dec.step(token), args.iters)

        def gen():
            for _ in stream(model, prompt, args.gen_len, temperature=0, decoder=dec):
                pass

        gen_ms = wall_ms(gen) / args.gen_len
        # correctness guard: graph steps equal the eager PyTorch steps (float32 states, shifted conv) from the
        # same prompt, over 8 tokens
        dec.prefill(prompt)
        eager = Decoder(model, batch, args.prompt_len + 16, cuda_graph=False, ring_conv=False)
        use("torch", "torch")
        eager.prefill(prompt)
        errs = []
        for _ in range(8):
            g = dec.step(token).float()
            e = eager.step(token).float()
            errs.append(((g - e).norm() / e.norm()).item())
            token = e.argmax(-1)
    del model, dec, eager
    torch.cuda.empty_cache()
    return dict(step_ms=step_ms, gen_ms=gen_ms, capture_s=capture_s, max_rel_err_vs_torch=max(errs),
                gated_norm="triton" if norm_impl is None else "torch",
                prefill="triton" if prefill_impl is None else "torch")


# ---------------------------------------------------------------------------------------------------------------
def import_mamba_ssm(peers: Path):
    """mamba_ssm's modules without its package __init__ (which imports compiled CUDA extensions)."""
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

    conv = "causal_conv1d built" if getattr(m2, "causal_conv1d_update", None) is not None else \
        "WITHOUT causal_conv1d (PyTorch conv fallback)"
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
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=Path, default=Path(".peers"), help="folder holding mamba_ssm's source")
    p.add_argument("--models", nargs="+", default=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["ours", "ours_bf16_state",
                                                                              "ours_unfused"],
                   help="ours: fused conv+state kernel, float32 states; ours_bf16_state: states stored in bf16 "
                        "(as mamba_ssm does for bf16 models); ours_unfused: separate conv and state kernels; "
                        "ours_compiled: the step through torch.compile (slow to start)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}, {torch.cuda.get_device_name()}")
    try:
        MambaConfig, MambaLMHeadModel, conv = import_mamba_ssm(args.peers)
        print(f"[mamba_ssm] imported from {args.peers}, {conv}")
    except Exception as e:  # noqa: BLE001
        MambaConfig = MambaLMHeadModel = None
        conv = f"not importable: {type(e).__name__}: {e}"
        print(f"[mamba_ssm] {conv}")
    variants = args.variants
    rows = {(name, batch): dict(model=name, batch=batch) for name in args.models for batch in args.batches}

    def save():
        if args.out:
            args.out.write_text(json.dumps(dict(
                device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
                mamba_ssm_conv=conv, args={k: str(v) for k, v in vars(args).items()}, rows=list(rows.values())),
                indent=2))

    # compiled variants last: their compile time is the least predictable, and the rest is saved first
    for i, variant in enumerate(variants):
        for (name, batch), row in rows.items():
            try:
                row[variant] = ours(name, batch, args, variant)
            except Exception as e:  # noqa: BLE001
                row[variant] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            print(name, batch, variant, row[variant], flush=True)
            if i == 0 and MambaLMHeadModel is not None:
                try:
                    row["mamba_ssm"] = theirs(name, batch, args, MambaConfig, MambaLMHeadModel)
                except Exception as e:  # noqa: BLE001
                    row["mamba_ssm"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                print(name, batch, "mamba_ssm", row["mamba_ssm"], flush=True)
            save()
    rows = list(rows.values())

    def fmt(r, key):
        v = r.get(key)
        if not v or "error" in v:
            return f"{'error':>15}"
        return f"{v['step_ms']:7.3f} {v['gen_ms']:7.3f}"

    cols = list(variants) + ["mamba_ssm"]
    print(f"\nms per decode step / per generated token (step = captured step replayed; gen = generate() of "
          f"{args.gen_len} tokens after {args.prompt_len}, per token). mamba_ssm: {conv}")
    print(f"{'model':<12} {'batch':>5} | " + " | ".join(f"{c:^15}" for c in cols) + " | step ours/mamba_ssm")
    for r in rows:
        ratio = float("nan")
        if "error" not in r.get("ours", {"error": 1}) and "error" not in r.get("mamba_ssm", {"error": 1}):
            ratio = r["ours"]["step_ms"] / r["mamba_ssm"]["step_ms"]
        print(f"{r['model']:<12} {r['batch']:>5} | " + " | ".join(fmt(r, c) for c in cols) + f" | {ratio:.2f}")


if __name__ == "__main__":
    main()
