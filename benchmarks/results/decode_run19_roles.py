"""Per-role times of the pipeline kernel at batch 64 (130m / 370m shapes), back-to-back launches of one stage.
A run record: it ran against commit 1e49ba4, where RowPipeline.launches held each launch's role tuples and
decode_pipeline.pipeline_stage launched them (now prepare_stage + launch_stage)."""
import sys, json, torch, itertools
from lit_mamba2 import Mamba2Config
from lit_mamba2.generation import Decoder
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.kernels import decode_pipeline as dp, state_update as su, pdl

def bench(fn, n=50, reps=7):
    """fn captured n times in a CUDA graph; median replay time per launch (µs)."""
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / n)
    return sorted(ts)[len(ts)//2]

configs = json.loads(sys.argv[1])
for name in sys.argv[2].split(","):
    with torch.device("cuda"):
        model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).to(torch.bfloat16).eval()
    for cfg in configs:
        saved = {}
        for k, v in cfg.items():
            mod, attr = k.split(".")
            m = dp if mod == "dp" else su
            saved[(m, attr)] = getattr(m, attr); setattr(m, attr, tuple(v) if isinstance(v, list) else v)
        try:
            with torch.inference_mode(), pdl.launching():
                dec = Decoder(model, 64, 32, cuda_graph=False, row_groups=3)
                rp = dec.row_pipeline
                L = rp.launches
                steady = L[2:-2]  # every launch with all three roles, over all layers
                args = (rp.bufs, rp.nheads, rp.headdim, rp.dstate, rp.block_m)

                def idle(role, k):
                    return (0, 0) + tuple(role[2:])

                def run(keep):
                    def fn():
                        for I, O, S in steady:
                            dp.pipeline_stage(*args, I if "I" in keep else idle(I, 0), O if "O" in keep else idle(O, 0),
                                              S if "S" in keep else idle(S, 0))
                    return fn
                res = {}
                for keep in ("I", "O", "S", "IO", "IOS"):
                    res[keep] = bench(run(keep), n=1) / len(steady)
                ks = list(dp._pipeline_kernel.device_caches.values())[0][0].values()
                regs = sorted({(k.n_regs, k.n_spills, k.metadata.shared) for k in ks})
            print(name, json.dumps(cfg), {k: round(v, 2) for k, v in res.items()}, "regs/spills/smem", regs, flush=True)
        except Exception as e:
            print(name, json.dumps(cfg), "FAILED", type(e).__name__, str(e)[:300], flush=True)
        finally:
            for (m, attr), v in saved.items(): setattr(m, attr, v)
            dp._pipeline_kernel.device_caches.clear() if hasattr(dp._pipeline_kernel, "device_caches") else None
    del model; torch.cuda.empty_cache()
