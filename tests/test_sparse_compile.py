"""Sparse methods run inside diffusers' regional compilation with fullgraph=True (no graph breaks in the hot path)."""

import pytest
import torch

import attention

SETTINGS = [("vmoba", dict(threshold=0.3)), ("rectified", dict(sparsity=0.75)), ("xattention", dict(threshold=0.9))]


@pytest.mark.parametrize("name,options", SETTINGS)
def test_sparse_method_compiles_with_fullgraph_and_matches_eager(name, options):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
        ffn_dim=32, num_layers=3, patch_size=(1, 2, 2), rope_max_seq_len=32,
    ).eval()
    x, text, t = torch.randn(1, 4, 4, 16, 16), torch.randn(1, 5, 16), torch.tensor([500])
    attention.apply(model, name, block_size=16, **options)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, t, text).sample
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        compiled = model(x, t, text).sample
    assert (compiled - eager).abs().max() < 1e-4
    # The method really ran sparse: the result differs from the model's own dense attention.
    attention.remove(model)
    with torch.no_grad():
        dense = model(x, t, text).sample
    assert (dense - eager).abs().max() > 1e-6
