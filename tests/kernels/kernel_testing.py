"""What the kernel tests share. Import it before anything that imports triton: the kernels run under Triton's
interpreter on CPU (TRITON_INTERPRET=1, the default here) or, with TRITON_INTERPRET=0, compiled on a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
# for a module's pytestmark: compiled kernels need a GPU
needs_interpreter_or_cuda = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                               reason="needs CUDA or TRITON_INTERPRET=1")


# for modules whose tensors live on the CPU: they run under the interpreter only
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU tensors: runs under TRITON_INTERPRET=1")


def rel(a, b):
    """||a - b|| / ||b||, in float64; 0 where both are zero (an all-zero reference otherwise gives a huge value)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@torch.no_grad()
def spread_decays(model):
    """Random offsets on every layer's dt_bias and A_log, so that the SSM state matters over the whole prompt (the
    default init gives every head a similar, fast decay); returns the model."""
    for name, p in model.named_parameters():
        if name.endswith(("dt_bias", "A_log")):
            p.add_(torch.randn_like(p))
    return model
