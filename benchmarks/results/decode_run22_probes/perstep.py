"""Per-step times of captured decode steps, grouped by the token's slot in the state window."""
import sys, torch
from lit_mamba2 import Mamba2Config
from lit_mamba2.generation import Decoder
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.kernels import decode_pipeline as dp, state_update as su
batch = 64
for name in sys.argv[1].split(","):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).to(torch.bfloat16).eval()
    prompt = torch.randint(1, 50000, (batch, 16), device="cuda")
    for spec in sys.argv[2].split(","):
        W, *patch = spec.split(":")
        W = int(W)
        if "r128" in patch:
            dp.MAXNREG = 128
        if "st8k" in patch:
            su.STATE_TILE = (8192, 4)
        with torch.no_grad():
            dec = Decoder(model, batch, 16 + 200, cuda_graph=True, row_groups=3, state_window=W)
            dec.prefill(prompt)
            token = torch.randint(1, 50000, (batch,), device="cuda")
            for _ in range(32):
                dec.step(token)
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(128)]
            torch.cuda.synchronize()
            pos0 = int(dec.pos.cache_pos)
            for a, b in ev:
                a.record(); dec.step(token); b.record()
            torch.cuda.synchronize()
        ts = [a.elapsed_time(b) for a, b in ev]
        by = {}
        for i, t in enumerate(ts):
            by.setdefault((pos0 + i) % W, []).append(t)
        row = " ".join(f"k{k}:{sorted(v)[len(v)//2]:.3f}" for k, v in sorted(by.items()))
        print(f"{name} W={W} {patch} mean {sum(ts)/len(ts):.3f} | {row}", flush=True)
        dp.MAXNREG = None
        su.STATE_TILE = (4096, 4)
        del dec
    del model
    torch.cuda.empty_cache()

for dev, caches in dp._pipeline_kernel.device_caches.items():
    for key, k in caches[0].items():
        print("n_regs", k.n_regs, "n_spills", k.n_spills, "shared", k.metadata.shared, str(key)[-120:-100])
