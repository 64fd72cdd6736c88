"""kernels.partial_sums (under TRITON_INTERPRET=1 on CPU) against a float64 sum."""

from kernel_testing import interpreter_only  # (first: it sets TRITON_INTERPRET)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
pytestmark = interpreter_only

from lit_mamba2.kernels.partial_sums import sum_partials  # noqa: E402


@pytest.mark.parametrize("shape", [(1, 5), (3, 33), (2, 7, 64), (300, 40), (0, 9), (4, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_partials_adds_every_leading_row(shape, dtype):
    part = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    out = sum_partials(part, dtype)
    ref = part.double().flatten(0, -2).sum(0)
    assert out.shape == (shape[-1],) and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol * max(1.0, shape[0] ** 0.5))


def test_sum_partials_refuses_non_float32_or_strided_partials():
    with pytest.raises(ValueError, match="float32"):
        sum_partials(torch.ones(3, 4, dtype=torch.float64), torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        sum_partials(torch.ones(4, 3).t(), torch.float32)
