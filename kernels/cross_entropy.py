"""Cross-entropy fused with the LM head: F.cross_entropy((hidden @ weight.T).float(), labels) without the (N, V)
logits.

Tokens go through in chunks of rows. For each chunk, torch's matmul makes the chunk's logits in the input dtype (as
the unfused path does), one Triton program per row computes its log-sum-exp and loss and, when gradients are
needed, overwrites the logits in place with d loss / d logits = (softmax - onehot) * scale; two more matmuls turn
that into the chunk's rows of d hidden and its share of d weight (accumulated in float32). So the backward work is
done during the forward, at the price of one (chunk, V) buffer instead of several (N, V) float32 tensors, and the
backward only scales the stored gradients by the incoming grad_output.
"""

import torch
import triton
import triton.language as tl

CHUNK_ELEMENTS = 1 << 28  # logits per chunk: 512 MiB in bf16; fewer chunks mean fewer passes over d weight


@triton.jit
def _ce_rows_kernel(logits_ptr, labels_ptr, loss_ptr, scale_ptr, V, stride_row, ignore_index,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int32)
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(ptr + v0 + cols, mask=v0 + cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = label != ignore_index
    target = tl.load(ptr + label, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + cols
            x = tl.load(ptr + idx, mask=idx < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(idx == label, 1.0, 0.0)) * scale
            tl.store(ptr + idx, g.to(logits_ptr.dtype.element_ty), mask=idx < V)


_FP32_ADDMM = {}  # device type -> whether addmm with out_dtype=float32 works for half inputs


def _accumulate(acc, a, b):
    """acc += a @ b with float32 accumulation, for half or float a, b."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return acc
    key = (acc.device.type, a.dtype)
    if _FP32_ADDMM.get(key, True):
        try:
            out = torch.addmm(acc, a, b, out_dtype=acc.dtype)
            _FP32_ADDMM[key] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_ADDMM[key] = False
    acc += torch.mm(a, b).to(acc.dtype)
    return acc


@torch.library.custom_op("lit_mamba2::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, mean: bool,
             compute_grad: bool, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, d = hidden.shape
    V = weight.shape[0]
    valid = labels != ignore_index
    n_valid = valid.sum()
    scale = (1.0 / n_valid.float()) if mean else torch.ones((), device=hidden.device)
    scale = scale.reshape(1).to(torch.float32)
    losses = torch.empty(N, device=hidden.device, dtype=torch.float32)
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if compute_grad:
        dh = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        dw = torch.zeros(V, d, device=weight.device, dtype=acc_dtype)
    BLOCK_V = min(4096, triton.next_power_of_2(V))
    for start in range(0, N, chunk_rows):
        end = min(N, start + chunk_rows)
        h = hidden[start:end]
        logits = torch.mm(h, weight.t())
        _ce_rows_kernel[(end - start,)](logits, labels[start:end], losses[start:end], scale, V, logits.stride(0),
                                        ignore_index, WRITE_GRAD=compute_grad, BLOCK_V=BLOCK_V, num_warps=8)
        if compute_grad:  # logits now hold d loss / d logits
            torch.mm(logits, weight, out=dh[start:end])
            dw = _accumulate(dw, logits.t(), h)
        del logits
    loss = losses.sum()
    if mean:
        loss = loss / n_valid
    if not compute_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0)
    return loss, dh, dw.to(weight.dtype)


@_lce_fwd.register_fake
def _(hidden, weight, labels, ignore_index, mean, compute_grad, chunk_rows):
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0)
    # both gradients are allocated contiguous (torch.empty_like(weight) would keep a dense but transposed weight's
    # strides)
    return (loss, torch.empty_like(hidden, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape))


def _setup(ctx, inputs, output):
    _, dh, dw = output
    ctx.save_for_backward(dh, dw)
    ctx.mark_non_differentiable(dh, dw)


def _backward(ctx, dloss, _dh, _dw):
    dh, dw = ctx.saved_tensors
    if dh.numel() == 0 and dw.numel() == 0:
        raise RuntimeError("linear_cross_entropy: backward through a forward run without gradients enabled")
    return dh * dloss.to(dh.dtype), dw * dloss.to(dw.dtype), None, None, None, None, None


_lce_fwd.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean",
                         chunk_rows: int | None = None):
    """F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=..., reduction=...) in chunks of rows.

    hidden: (N, d); weight: (V, d), same dtype; labels: (N,) integer. Returns a float32 scalar; the per-row
    statistics are float32 whatever the input dtype, as in the unfused path."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden (N, d) and weight (V, d) must share d, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels must have shape ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if torch.is_autocast_enabled(hidden.device.type):  # as autocast would run the LM head's matmul
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    N, V = hidden.shape[0], weight.shape[0]
    if chunk_rows is None:
        n_chunks = max(1, triton.cdiv(N * V, CHUNK_ELEMENTS))
        chunk_rows = max(1, triton.cdiv(N, n_chunks))
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, _, _ = _lce_fwd(hidden, weight, labels, int(ignore_index), reduction == "mean", compute_grad,
                              int(chunk_rows))
    return loss
