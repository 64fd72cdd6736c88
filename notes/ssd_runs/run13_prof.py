# per-kernel profile of ours at given chunk sizes (session 6 probe)
import sys, types, argparse
sys.path.insert(0, "benchmarks")
import bench_ssd
from lit_mamba2.kernels import ssd as kernels
ap = argparse.ArgumentParser(); ap.add_argument("--cs", type=int, nargs="+"); ap.add_argument("--dstate", type=int, nargs="+")
ap.add_argument("--seqlens", type=int, nargs="+")
a = ap.parse_args()
base = dict(kernels.CONFIG)
for cs in a.cs:
    for n in a.dstate:
        args = types.SimpleNamespace(nheads=32, headdim=64, chunk_size=cs, sweep_by="fb")
        print(f"=== chunk {cs}")
        bench_ssd.profile_config(args, kernels, base, n, {}, a.seqlens)
