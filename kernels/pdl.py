"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

In a captured decode step each kernel waits for the one before it; between two dependent kernels the GPU idles
~1-2 µs (launch, grid set-up, the previous grid's tail). With PDL a kernel is launched with the
programmatic-stream-serialization attribute (Triton: `launch_pdl=True`) and may start while the previous kernel
still runs: it does its set-up and loads what no earlier kernel of the step writes (weights, its own state from
the previous token), then `gdc_wait()` blocks until the previous grid has finished and its writes are visible.
Right after its wait it calls `gdc_launch_dependents()`, so the next kernel may start early in turn.

Correctness rules every kernel with USE_PDL follows:
- every program calls gdc_wait() (unconditionally, once) before it reads anything an earlier kernel of the step
  writes, and before it writes anything. Then each kernel completes only after its predecessor has, so the wait
  covers all earlier kernels too (transitively);
- gdc_launch_dependents() comes after the wait (USE_PDL = 1), so at most two kernels overlap: the next one's
  pre-wait part never runs beside a kernel that is still before its own wait. Kernels whose pre-wait part reads
  only what no kernel of the same step writes (weights, parameters, a layer's own state from the previous token)
  may release at their start instead (USE_PDL = 2, `release_early`, where EARLY_RELEASE is on): the next kernel
  then starts its loads a kernel sooner. Still correct at any depth of overlap: a kernel's wait returns only once
  its predecessor completed, and that one completed only after its own wait returned, and so on back;
- kernels launched without the attribute (cuBLAS, PyTorch ops) keep full stream order on both sides.

CUDA graphs keep it: Triton launches through cuLaunchKernelEx with the attribute, and stream capture (CUDA >= 12.3)
records it as a programmatic dependency edge, which the replay honours; torch.cuda.graph only captures the stream.
Off (USE_PDL=0, no attribute) under TRITON_INTERPRET, on CPUs, before compute capability 9, and on Tritons
without `tl.extra.cuda.gdc_wait` (it exists from Triton 3.4; 3.6 on the device, 3.9 here).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_enabled = False
# Kernels that opt in (options(early=True)) release their dependents at their start instead of after their wait.
# H100 (sm_90), batch 1: 0.230 -> 0.206 ms per step (mamba2-130m), 0.541 -> 0.482 (370m)
EARLY_RELEASE = True


def supported(device=None) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    if cuda is None or not hasattr(cuda, "gdc_wait") or not hasattr(cuda, "gdc_launch_dependents"):
        return False
    try:  # the launch option (a field of the CUDA backend's compile options)
        from triton.backends.nvidia.compiler import CUDAOptions

        if "launch_pdl" not in CUDAOptions.__dataclass_fields__:
            return False
    except (ImportError, AttributeError):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@contextlib.contextmanager
def launching(on: bool = True):
    """Within the block, the decode kernels launch with PDL where `supported()` (else unchanged)."""
    global _enabled
    before = _enabled
    _enabled = bool(on) and supported()
    try:
        yield _enabled
    finally:
        _enabled = before


def options(early: bool = False) -> dict:
    """Keyword arguments for a kernel launch: the USE_PDL constexpr (0 off, 1 release after the wait, 2 release at
    the start: `early` kernels, where EARLY_RELEASE is on), and Triton's launch_pdl option when on."""
    if not _enabled:
        return dict(USE_PDL=0)
    return dict(USE_PDL=2 if early and EARLY_RELEASE else 1, launch_pdl=True)


@triton.jit
def release_early(USE_PDL: tl.constexpr):
    """At a kernel's start: with USE_PDL == 2 the next kernel may launch now (its wait still covers this one)."""
    if USE_PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_and_release(USE_PDL: tl.constexpr):
    """The previous kernel's writes are visible after this; the next kernel may launch (if not released yet)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if USE_PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()
