"""The row-group pipeline of the decode step (Decoder(row_groups=), kernels/decode_pipeline.py) under
TRITON_INTERPRET=1 on CPU: whole steps against the eager PyTorch step (unfused conv, separate gated norm, PyTorch
linears and norms) from the same prefilled states, rows that do not leak into each other, and clear refusals."""

from kernel_testing import DEVICE, needs_interpreter_or_cuda, rel, spread_decays  # (first: it sets TRITON_INTERPRET)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

pytestmark = needs_interpreter_or_cuda


def pipeline_model(dtype, residual_in_fp32=True, d_model=64, **ssm):
    """A tiny pure Mamba-2 model whose gated norms fold (one group), with norm weights and dt / A not at their
    initial values, so that every parameter's placement matters."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.model import Mamba2LMHeadModel

    torch.manual_seed(0)
    cfg = Mamba2Config.from_name("mamba2-test", d_model=d_model, residual_in_fp32=residual_in_fp32,
                                 ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 16, **ssm})
    model = spread_decays(Mamba2LMHeadModel(cfg).eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.uniform_(0.5, 1.5)
            if name.endswith(".D"):
                p.uniform_(0.5, 1.5)
    return model.to(device=DEVICE, dtype=dtype)


def decode(model, prompts, tokens, **options):
    """Prefill (PyTorch chunked path) the left-padded prompts, then step `tokens` (a list of (batch,) tensors)
    through a Decoder with `options`; impl "triton" for the pipeline, "torch" for the reference."""
    from lit_mamba2.generation import pad_prompts
    from lit_mamba2.inference import Decoder

    ids, seq_idx, lengths, pads = pad_prompts(prompts, DEVICE)
    pipelined = bool(options.get("row_groups"))
    with torch.no_grad():
        model.set_impl("torch")  # prefill: the PyTorch chunked path
        dec = Decoder(model, len(prompts), 16, cuda_graph=False, impl="triton" if pipelined else "torch",
                      **options)
        assert (dec.row_pipeline is not None) == pipelined
        dec.prefill(ids, seq_idx, lengths, pads)
        out = [dec.step(t.to(DEVICE)).clone().float() for t in tokens]
    model.set_impl(None)
    return out


REFERENCE = dict(ring_conv=False, fuse_linear=False, fold_gated_norm=False, row_groups=0)


@pytest.mark.parametrize("dtype,residual_in_fp32,d_model,ssm,groups,batch", [
    (torch.float32, True, 64, {}, 3, 4),
    # tiles straddle the z | xBC | dt and d_model boundaries (d_state 8, d_model 48), D per channel, no conv
    # bias, a dt limit, the residual in the model's dtype, uneven groups (2, 2, 1)
    (torch.float32, False, 48, {"d_state": 8, "D_has_hdim": True, "conv_bias": False, "dt_limit": (0.01, 0.5)},
     3, 5),
    (torch.float32, True, 64, {}, 2, 3),
    (torch.float32, True, 64, {}, 1, 2),
    (torch.bfloat16, True, 64, {}, 3, 4),
])
def test_pipeline_step_equals_pytorch_step(dtype, residual_in_fp32, d_model, ssm, groups, batch):
    """Three steps of a left-padded batch, pipelined in `groups` row groups, against the eager PyTorch step."""
    model = pipeline_model(dtype, residual_in_fp32, d_model, **ssm)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5], [9], [200, 100, 50, 25]][:batch]
    tokens = [torch.arange(batch) + t for t in (3, 40, 7)]
    ref = decode(model, prompts, tokens, **REFERENCE)
    got = decode(model, prompts, tokens, row_groups=groups)
    # float32: summation order and where the norms' scales are applied (measured ~5e-7). bf16 (measured ~1e-2,
    # as the folded step against the same reference): activations rounded at different points, bf16 states
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for g, r in zip(got, ref):
        assert g.shape == r.shape and rel(g, r) < tol, rel(g, r)


def test_pipeline_rows_do_not_leak_into_each_other():
    """A different token in row 0 (group 0) leaves every other row's logits bitwise unchanged, over two steps:
    the stages of a launch work on different groups' rows of the shared buffers."""
    model = pipeline_model(torch.float32)
    prompts = [[5, 6, 7], [10, 11, 12], [3, 4, 5], [9, 8, 7]]
    a = decode(model, prompts, [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])], row_groups=3)
    b = decode(model, prompts, [torch.tensor([100, 2, 3, 4]), torch.tensor([50, 6, 7, 8])], row_groups=3)
    for x, y in zip(a, b):
        assert torch.equal(x[1:], y[1:])
        assert not torch.equal(x[0], y[0])


def test_pipeline_refuses_models_it_cannot_run():
    """An explicit row_groups on a model with attention layers, or with gated norms that cannot fold, is refused
    with the reason; by default such models keep the ordinary step."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.inference import Decoder
    from lit_mamba2.model import Mamba2LMHeadModel

    hybrid = Mamba2LMHeadModel(Mamba2Config.from_name(
        "mamba2attn-test", d_intermediate=0, ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 1})).to(DEVICE)
    with pytest.raises(ValueError, match="layer 1 is an attention layer"):
        Decoder(hybrid, 4, 8, cuda_graph=False, row_groups=3)
    assert Decoder(hybrid, 64, 8, cuda_graph=False).row_pipeline is None
    two_groups = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")).to(DEVICE)  # ngroups 2: no fold
    with pytest.raises(ValueError, match="gated norm cannot fold"):
        Decoder(two_groups, 4, 8, cuda_graph=False, row_groups=3)
    model = pipeline_model(torch.float32)
    with pytest.raises(ValueError, match="row_groups needs"):
        Decoder(model, 4, 8, cuda_graph=False, row_groups=3, ring_conv=False)
    with pytest.raises(ValueError, match="row_groups must be 0-3"):
        Decoder(model, 4, 8, cuda_graph=False, row_groups=4)


def test_pipeline_decoder_follows_a_pytorch_impl(monkeypatch):
    """A Decoder with row groups on the PyTorch path steps through the PyTorch forms of the pipeline's flags (ring
    states, folded norm; no pipeline launch), equal to the reference decoder's steps."""
    from lit_mamba2.generation import pad_prompts
    from lit_mamba2.inference import Decoder
    from lit_mamba2.kernels import decode_pipeline

    model = pipeline_model(torch.float32)
    prompts = [[5, 6, 7], [10, 11], [3]]
    tokens = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])]
    ref = decode(model, prompts, tokens, **REFERENCE)
    ids, seq_idx, lengths, pads = pad_prompts(prompts, DEVICE)

    def launched(*args, **kwargs):
        raise AssertionError("the pipeline launched under impl='torch'")

    monkeypatch.setattr(decode_pipeline, "launch_stage", launched)
    monkeypatch.setattr(decode_pipeline, "embed_rows", launched)
    with torch.no_grad():
        model.set_impl("torch")
        dec = Decoder(model, 3, 16, cuda_graph=False, row_groups=3)
        assert dec.row_pipeline is None and dec.ring_conv and dec.fold_gated_norm
        dec.prefill(ids, seq_idx, lengths, pads)
        got = [dec.step(t.to(DEVICE)).float() for t in tokens]
    model.set_impl(None)
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-5
