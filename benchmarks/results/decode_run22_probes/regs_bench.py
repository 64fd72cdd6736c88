"""bench_decode.main() with the remaining argv, then the registers of each compiled row-pipeline kernel."""
import sys
sys.path.insert(0, "benchmarks")
import bench_decode
sys.argv = ["bench_decode.py"] + sys.argv[1:]
try:
    bench_decode.main()
finally:
    from lit_mamba2.kernels import decode_pipeline as dp
    for dev, caches in dp._pipeline_kernel.device_caches.items():
        for key, k in caches[0].items():
            ks = str(key)
            print("n_regs", k.n_regs, "n_spills", k.n_spills, "shared", k.metadata.shared, "key", ks[-160:])
