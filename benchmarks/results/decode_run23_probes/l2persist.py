"""Decode step time against the L2 set-aside for persisting (evict_last) lines: cuCtxSetLimit(PERSISTING_L2)."""
import ctypes, sys, torch
from lit_mamba2 import Mamba2Config
from lit_mamba2.generation import Decoder
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.kernels import decode_pipeline as dp, state_update as su

cuda = ctypes.CDLL("libcuda.so.1")
LIMIT = 0x06  # CU_LIMIT_PERSISTING_L2_CACHE_SIZE
torch.zeros(1, device="cuda")
mx = ctypes.c_int()
print("set limit rc probe", cuda.cuDeviceGetAttribute(ctypes.byref(mx), 108, 0), "max persisting", mx.value,
      "L2", torch.cuda.get_device_properties(0).L2_cache_size, flush=True)

def set_aside(n):
    rc = cuda.cuCtxSetLimit(LIMIT, ctypes.c_size_t(n))
    got = ctypes.c_size_t()
    cuda.cuCtxGetLimit(ctypes.byref(got), LIMIT)
    cuda.cuCtxResetPersistingL2Cache()
    return rc, got.value

def timed(dec, token, reps=5, n=50):
    for _ in range(20):
        dec.step(token)
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(); a.record()
        for _ in range(n):
            dec.step(token)
        b.record(); torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / n)
    return sorted(out)[len(out) // 2]

MB = 1 << 20
sizes = [int(s) * MB for s in sys.argv[3].split(",")]
for name in sys.argv[1].split(","):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).to(torch.bfloat16).eval()
    for spec in sys.argv[2].split(","):
        batch, wev, sev = spec.split(":")
        batch = int(batch)
        dp.WEIGHT_EVICT = wev
        su.STATE_EVICT = sev
        prompt = torch.randint(1, 50000, (batch, 16), device="cuda")
        set_aside(0)
        with torch.no_grad():
            dec = Decoder(model, batch, 16 + 8000, cuda_graph=True)
            dec.prefill(prompt)
            token = torch.randint(1, 50000, (batch,), device="cuda")
            res = []
            for s in sizes + sizes[::-1]:
                rc, got = set_aside(s)
                res.append(f"{s // MB}MB(rc{rc},{got // MB}):{timed(dec, token):.4f}")
        print(name, spec, " ".join(res), flush=True)
        del dec
        torch.cuda.empty_cache()
    del model
set_aside(0)
