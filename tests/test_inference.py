"""The decode engine (lit_mamba2.inference) on its PyTorch path: every specialisation of the step (ring conv
state, fused linears, folded gated norm) against model.forward token by token, in float64. The Triton forms of
the same steps are checked against these in tests/kernels/test_decode_*.py and test_state_update*.py."""

import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.generation import pad_prompts
from lit_mamba2.inference import Decoder, ModelWeights
from lit_mamba2.model import Mamba2LMHeadModel

FLAGS = [dict(ring_conv=False, fuse_linear=False, fold_gated_norm=False),
         dict(ring_conv=True, fuse_linear=False, fold_gated_norm=False),
         dict(ring_conv=False, fuse_linear=True, fold_gated_norm=False),
         dict(ring_conv=True, fuse_linear=True, fold_gated_norm=False),
         dict(ring_conv=False, fuse_linear=False, fold_gated_norm=True),
         dict(ring_conv=True, fuse_linear=False, fold_gated_norm=True)]


def model_for(preset, **overrides):
    """ngroups 1 so that the gated norm folds; norm weights and D away from 1 so that their placement matters."""
    torch.manual_seed(0)
    cfg = Mamba2Config.from_name(preset, ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 16},
                                 **overrides)
    model = Mamba2LMHeadModel(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(k for k, v in f.items() if v) or "plain")
@pytest.mark.parametrize("preset,overrides", [("mamba2-test", {}), ("mamba2attn-test", {}),
                                              ("mamba2attn-test", {"d_intermediate": 0})])
def test_every_decode_step_form_equals_forward_token_by_token(preset, overrides, flags):
    model = model_for(preset, **overrides)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [23, 24], [25, 26, 27, 28, 29]]
    steps = [torch.tensor([1, 2, 3]), torch.tensor([40, 50, 60]), torch.tensor([7, 8, 9]), torch.tensor([4, 4, 4])]
    ids, seq_idx, lengths, pads = pad_prompts(prompts, "cpu")
    with torch.no_grad():
        dec = Decoder(model, 3, ids.shape[1] + len(steps) + 1, cuda_graph=False, impl="torch", **flags)
        assert (dec.ring_conv, dec.fuse_linear, dec.fold_gated_norm) == tuple(flags.values())
        got = [dec.prefill(ids, seq_idx, lengths, pads)] + [dec.step(t).clone() for t in steps]
        for i, p in enumerate(prompts):
            seq = torch.tensor([p + [int(t[i]) for t in steps]])
            want = model(seq)[0, len(p) - 1:]
            for k, g in enumerate(got):
                torch.testing.assert_close(g[i], want[k], rtol=0, atol=1e-9, msg=f"row {i}, token {k}")


def test_model_weights_are_a_view_of_the_parameters():
    """The weights view holds the model's own tensors (no copy): an update to the model reaches the decoder."""
    model = model_for("mamba2attn-test")
    w = ModelWeights.of(model)
    layer0, layer1 = model.backbone.layers[0], model.backbone.layers[1]
    assert w.layers[0].mixer.in_proj is layer0.mixer.in_proj.weight
    assert w.layers[0].mixer.conv.data_ptr() == layer0.mixer.conv1d.weight.data_ptr()
    assert w.layers[1].mixer.in_proj is layer1.mixer.in_proj.weight  # attention
    assert w.embedding is model.backbone.embedding.weight and w.lm_head is model.lm_head.weight
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        dec = Decoder(model, 1, 8, cuda_graph=False, impl="torch")
        before = dec.prefill(ids)
        model.backbone.layers[0].mixer.out_proj.weight.mul_(2)
        after = dec.prefill(ids)
        torch.testing.assert_close(dec.step(torch.tensor([6])), model(torch.tensor([[3, 4, 5, 6]]))[:, -1],
                                   rtol=0, atol=1e-9)
    assert not torch.allclose(before, after)


def test_decoder_refuses_bad_options():
    model = model_for("mamba2-test")
    with pytest.raises(ValueError, match="impl must be one of"):
        Decoder(model, 1, 8, impl="cuda")
    with pytest.raises(ValueError, match="fold_gated_norm=True needs fuse_linear=False"):
        Decoder(model, 1, 8, cuda_graph=False, fuse_linear=True, fold_gated_norm=True)
