"""What context parallelism costs each rank, on one GPU: the state-passing correction and the halo exchange timed
against the SSD itself, and the communication volume per layer beside Megatron's all-to-all layout.

    python benchmarks/bench_context_parallel.py [--tokens 65536] [--presets mamba2-370m mamba2-2.7b] [--out cp.json]

One GPU cannot show scaling; this measures one rank's own work. It runs `lit_mamba2.parallel.context` on a
one-process NCCL group: the collectives move nothing, but every op a rank runs is there (the SSD with its final
state, the summaries' all-gather call, the decay cumsum and the C·h_in correction forward and backward, the conv
with its halo), on one Mamba-2 layer's shapes of each preset at --tokens positions per rank (batch 1, bf16).
The correction costs the same on every rank (rank 0's incoming state is zero but its work is the same). The scan
over the gathered summaries, which a rank runs for the ranks before it, is timed alone for cp = 2 ... 32.

The communication volume is computed, not measured: bytes each rank receives per layer, forward + backward:
- ours (state passing): the summaries (exp-decay and final state per head, fp32) all-gathered forward, the incoming
  states' gradients all-gathered backward; the conv halo (d_conv - 1 positions of xBC, bf16) each way. Independent of
  the sequence length.
- Megatron-LM's Mamba context parallel (head-parallel, all-to-all; cp <= nheads / tp): the layer's in_proj outputs
  z, x, dt go from sequence- to head-sharded and y comes back (all-to-alls: each rank keeps 1/cp of its part), B and
  C (ngroups < cp: not split by heads) gathered whole; the backward moves the same bytes. An estimate from the
  layout, not from Megatron's code.
- Attention layers of a hybrid (ours): K and V all-gathered forward, their gradients reduce-scattered backward.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import device_ms  # noqa: E402

from lit_mamba2 import Mamba2Config, ops  # noqa: E402

DEVICE = "cuda"


def one_process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        path = os.path.join(tempfile.mkdtemp(), "init")
        dist.init_process_group("nccl", init_method=f"file://{path}", rank=0, world_size=1)
    return dist.group.WORLD


def layer_inputs(cfg: Mamba2Config, L: int, requires_grad: bool, dtype=torch.bfloat16):
    s = cfg.ssm
    h, p, g, n = cfg.nheads, s.headdim, s.ngroups, s.d_state
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    conv_dim = cfg.d_ssm + 2 * g * n

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype).requires_grad_(requires_grad)

    xBC = rand(1, L, conv_dim)
    x, B, C = xBC.detach().split([cfg.d_ssm, g * n, g * n], dim=-1)
    ssd_in = dict(x=x.reshape(1, L, h, p).clone().requires_grad_(requires_grad),
                  dt=rand(1, L, h), A=-torch.rand(h, device=DEVICE, generator=gen) * 8 - 1,
                  B=B.reshape(1, L, g, n).clone().requires_grad_(requires_grad),
                  C=C.reshape(1, L, g, n).clone().requires_grad_(requires_grad),
                  D=torch.ones(h, device=DEVICE), dt_bias=torch.full((h,), -3.0, device=DEVICE))
    conv_in = dict(x=xBC, weight=rand(conv_dim, s.d_conv, scale=0.3), bias=torch.zeros(conv_dim, device=DEVICE))
    return ssd_in, conv_in, s.chunk_size


def timed(fn, backward: bool, n: int = 5) -> float:
    """Device time of fn() (and of its output's backward with a fixed gradient)."""
    if not backward:
        def run():
            with torch.no_grad():
                fn()
        return device_ms(run, n)
    out = fn()
    grad = torch.randn_like(out)

    def run():
        fn().backward(grad)
    return device_ms(run, n)


def measure(preset: str, L: int, context) -> dict:
    cfg = Mamba2Config.from_name(preset)
    res = {"preset": preset, "tokens_per_rank": L}
    for backward in (False, True):
        ssd_in, conv_in, cs = layer_inputs(cfg, L, backward)
        kw = dict(chunk_size=cs, D=ssd_in["D"], dt_bias=ssd_in["dt_bias"], dt_softplus=True)
        args = [ssd_in[k] for k in ("x", "dt", "A", "B", "C")]
        tag = "fwd_bwd" if backward else "fwd"
        res[f"ssd_{tag}_ms"] = timed(lambda: ops.ssd(*args, **kw), backward)
        res[f"ssd_final_state_{tag}_ms"] = timed(
            lambda: _with_state(ops.ssd(*args, **kw, return_final_states=True)), backward)
        res[f"cp_ssd_{tag}_ms"] = timed(lambda: context.ssd(*args, **kw), backward)
        conv_args = (conv_in["x"], conv_in["weight"], conv_in["bias"])
        res[f"conv_{tag}_ms"] = timed(lambda: ops.causal_conv1d(*conv_args, activation="silu"), backward)
        res[f"cp_conv_{tag}_ms"] = timed(lambda: context.causal_conv1d(*conv_args, activation="silu"), backward)
        # what state passing adds to the SSD: its final state, then the summaries' gather and the correction
        res[f"correction_{tag}_ms"] = res[f"cp_ssd_{tag}_ms"] - res[f"ssd_final_state_{tag}_ms"]
        res[f"overhead_{tag}_fraction"] = res[f"cp_ssd_{tag}_ms"] / res[f"ssd_{tag}_ms"] - 1
    return res


def _with_state(out):
    y, final = out
    return y + final.sum().to(y.dtype) * 0  # the final state is part of the graph (its backward runs)


def scan_ms(cfg: Mamba2Config, cp: int) -> float:
    """The last rank's scan over the cp - 1 summaries before it (the forward's; the backward's reverse scan on the
    first rank is the same work)."""
    h, p, n = cfg.nheads, cfg.ssm.headdim, cfg.ssm.d_state
    decay = torch.rand(cp, 1, h, device=DEVICE)
    states = torch.randn(cp, 1, h, p, n, device=DEVICE)

    def run():
        hin = torch.zeros_like(states[0])
        for j in range(cp - 1):
            hin = decay[j, :, :, None, None] * hin + states[j]
        return hin
    return device_ms(run, 10)


def volume(preset: str, L: int, cp: int) -> dict:
    """Bytes each rank receives per layer, forward + backward (see the module docstring)."""
    cfg = Mamba2Config.from_name(preset)
    s = cfg.ssm
    h, p, g, n, w = cfg.nheads, s.headdim, s.ngroups, s.d_state, s.d_conv
    conv_dim = cfg.d_ssm + 2 * g * n
    others = cp - 1
    ours = 2 * others * h * (p * n + 1) * 4 + 2 * others * (w - 1) * conv_dim * 2
    moved = L * (cfg.d_ssm + cfg.d_ssm + h + cfg.d_ssm) * 2 * others / cp  # z, x, dt out; y back
    bc = (cp * L - L) * 2 * g * n * 2  # B and C of the other ranks' positions
    megatron = 2 * (moved + bc)
    out = {"preset": preset, "cp": cp, "tokens_per_rank": L, "ours_mamba_bytes": ours,
           "megatron_a2a_mamba_bytes": megatron}
    if cfg.attn_layer_idx:
        a = cfg.attn
        out["ours_attention_bytes"] = 2 * others * 2 * L * a.num_heads_kv * a.head_dim * 2
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=65536, help="positions per rank")
    ap.add_argument("--presets", nargs="+", default=["mamba2-370m", "mamba2-2.7b"])
    ap.add_argument("--volume-presets", nargs="+", default=["mamba2-370m", "mamba2-2.7b", "mamba2attn-2.7b"])
    ap.add_argument("--cps", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    ap.add_argument("--out", default="bench_context_parallel.json")
    a = ap.parse_args()

    from lit_mamba2.parallel.context import ContextParallel

    context = ContextParallel(one_process_group())
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    timings = [measure(p, a.tokens, context) for p in a.presets]
    scans = [{"preset": p, "cp": cp, "scan_ms": scan_ms(Mamba2Config.from_name(p), cp)}
             for p in a.presets for cp in a.cps]
    volumes = [volume(p, a.tokens, cp) for p in a.volume_presets for cp in a.cps]

    print(f"{env['device']}, torch {env['torch']}; one Mamba-2 layer, {a.tokens} tokens per rank, batch 1, bf16; "
          "device ms")
    print(f"{'preset':16} {'pass':8} {'SSD':>8} {'+final':>8} {'CP SSD':>8} {'corr.':>8} {'CP/SSD-1':>8} "
          f"{'conv':>8} {'CP conv':>8}")
    for r in timings:
        for tag in ("fwd", "fwd_bwd"):
            print(f"{r['preset']:16} {tag:8} {r[f'ssd_{tag}_ms']:8.3f} {r[f'ssd_final_state_{tag}_ms']:8.3f} "
                  f"{r[f'cp_ssd_{tag}_ms']:8.3f} {r[f'correction_{tag}_ms']:8.3f} "
                  f"{r[f'overhead_{tag}_fraction']:8.1%} {r[f'conv_{tag}_ms']:8.3f} {r[f'cp_conv_{tag}_ms']:8.3f}")
    print("\nscan over the gathered summaries (the last rank's), device ms")
    for r in scans:
        print(f"{r['preset']:16} cp={r['cp']:<3} {r['scan_ms']:.4f}")
    print("\nbytes received per rank per layer, forward + backward (computed)")
    print(f"{'preset':16} {'cp':>3} {'ours (Mamba-2)':>16} {'Megatron a2a':>16} {'ratio':>8} {'ours (attn)':>14}")
    for r in volumes:
        print(f"{r['preset']:16} {r['cp']:3d} {r['ours_mamba_bytes'] / 2**20:13.2f} MiB "
              f"{r['megatron_a2a_mamba_bytes'] / 2**20:13.1f} MiB "
              f"{r['megatron_a2a_mamba_bytes'] / r['ours_mamba_bytes']:8.0f}x "
              + (f"{r['ours_attention_bytes'] / 2**20:11.1f} MiB" if "ours_attention_bytes" in r else ""))
    Path(a.out).write_text(json.dumps({"env": env, "timings": timings, "scans": scans, "volumes": volumes},
                                      indent=1))
    print(f"\nwritten: {a.out}")


if __name__ == "__main__":
    main()
