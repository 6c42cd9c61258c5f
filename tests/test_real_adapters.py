"""Attention adapters of diffusers models whose self-attention joins text tokens (HunyuanVideo, CogVideoX), on tiny
random models: dense through the adapter is the model itself (padded text included), a sparse method that keeps
every block is too while one that keeps few blocks is not, and `attention.remove` restores the model."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

import attention
from attention.adapters.joint_text import text_key_mask

# On the CPU the sparse method runs its PyTorch reference, which says so.
pytestmark = pytest.mark.filterwarnings("ignore:block-sparse attention. no Triton kernel")

BATCH, TEXT = 2, 6
GRID = (3, 4, 4)  # latent frames, height and width after patching (patch 2 in space)
SPARSE = dict(block_size=8)  # 48 video tokens: 6 blocks


def _hunyuan(padded: bool):
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 4, 4), patch_size=2, patch_size_t=1,
    ).eval()
    text_mask = torch.ones(BATCH, TEXT, dtype=torch.long)
    if padded:
        text_mask[1, 3:] = 0  # the second prompt is 3 tokens long
    inputs = dict(hidden_states=torch.randn(BATCH, 4, GRID[0], 8, 8), timestep=torch.tensor([900.0] * BATCH),
                  encoder_hidden_states=torch.randn(BATCH, TEXT, 16), encoder_attention_mask=text_mask,
                  pooled_projections=torch.randn(BATCH, 8), guidance=torch.tensor([3500.0] * BATCH))
    return model, inputs, [block.attn for block in (*model.transformer_blocks, *model.single_transformer_blocks)]


def _cogvideox(padded: bool):
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
    ).eval()
    rotary = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), GRID[1:]), grid_size=GRID[1:],
                                     temporal_size=GRID[0])
    inputs = dict(hidden_states=torch.randn(BATCH, GRID[0], 4, 8, 8), timestep=torch.tensor([900] * BATCH),
                  encoder_hidden_states=torch.randn(BATCH, TEXT, 16), image_rotary_emb=rotary)
    return model, inputs, [block.attn1 for block in model.transformer_blocks]


CASES = {"hunyuan": (_hunyuan, False), "hunyuan-padded-text": (_hunyuan, True), "cogvideox": (_cogvideox, False)}


@pytest.fixture(params=list(CASES))
def case(request):
    build, padded = CASES[request.param]
    return build(padded)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_dense_through_the_adapter_is_the_model(case):
    model, inputs, _ = case
    reference = _run(model, inputs)
    attention.apply(model, "dense")
    torch.testing.assert_close(_run(model, inputs), reference, rtol=1e-5, atol=1e-5)
    layout = attention.adapter_state(model).layout
    assert (layout.grid, layout.text_tokens) == (GRID, TEXT)
    assert layout.text_position == ("suffix" if isinstance(model, HunyuanVideoTransformer3DModel) else "prefix")


def test_sparse_method_matches_when_it_keeps_every_block_and_not_when_it_keeps_few(case):
    model, inputs, _ = case
    reference = _run(model, inputs)
    attention.apply(model, "oracle", threshold=1.0, **SPARSE)
    torch.testing.assert_close(_run(model, inputs), reference, rtol=1e-5, atol=1e-5)
    attention.apply(model, "oracle", sparsity=0.8, **SPARSE)  # 2 of 6 key blocks per query block
    assert (_run(model, inputs) - reference).abs().max() > 1e-3


def test_remove_restores_the_original_processors(case):
    model, inputs, modules = case
    reference = _run(model, inputs)
    processors = [module.processor for module in modules]
    attention.apply(model, "oracle", sparsity=0.8, **SPARSE)
    assert all(module.processor is not original for module, original in zip(modules, processors))
    attention.remove(model)
    assert all(module.processor is original for module, original in zip(modules, processors))
    assert not model._forward_pre_hooks
    assert torch.equal(_run(model, inputs), reference)


def test_padded_text_keys_are_left_out():
    model, inputs, _ = _hunyuan(padded=True)
    padded = _run(model, inputs)
    inputs["encoder_attention_mask"] = torch.ones_like(inputs["encoder_attention_mask"])
    assert (_run(model, inputs) - padded).abs().max() > 1e-3  # so the dense test above sees the padding


def test_text_key_mask_serves_text_padding_only():
    keep = torch.ones(2, 1, 1, 5 + 3, dtype=torch.bool)
    assert text_key_mask(None, 5, 3, text_first=False) == (True, None)
    assert text_key_mask(keep, 5, 3, text_first=False) == (True, None)
    keep[1, ..., 7] = False  # the last text key of the second sample
    servable, kept = text_key_mask(keep, 5, 3, text_first=False)
    assert servable and kept.tolist() == [[True] * 3, [True, True, False]]
    assert text_key_mask(keep, 5, 3, text_first=True)[0] is False  # read text first, it masks a video key
    assert text_key_mask(keep.float(), 5, 3, text_first=False)[0] is False  # an additive mask: the model's own
    assert text_key_mask(keep[:, :, :, :7], 5, 3, text_first=False)[0] is False


@pytest.mark.parametrize("padded", [True, False])
def test_inside_a_compiled_graph_the_mask_is_taken_unread_with_the_same_result(monkeypatch, padded):
    model, inputs, _ = _hunyuan(padded=padded)
    reference = _run(model, inputs)
    attention.apply(model, "dense")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    servable, kept = text_key_mask(torch.ones(1, 1, 1, 8, dtype=torch.bool), 5, 3, text_first=False)
    assert servable and kept.shape == (1, 3)  # not read: handed on as a mask even where nothing is masked
    torch.testing.assert_close(_run(model, inputs), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [37, 5])
def test_masked_text_attention_is_dense_attention_over_the_kept_keys(monkeypatch, rows):
    from attention.adapters import joint_text
    from attention.kernels import reference

    monkeypatch.setattr(joint_text, "_MASKED_ROWS", rows)  # 37 queries in one step, or in steps of 5
    q, k, v = torch.randn(3, 2, 37, 16), torch.randn(3, 2, 6, 16), torch.randn(3, 2, 6, 16)
    kept = torch.tensor([[True] * 6, [True, False, True, False, True, True], [False] * 6])
    out, lse = joint_text.masked_text_attention(q, k, v, kept)
    for b in (0, 1):
        want_out, want_lse = reference.dense_attention(q[b:b + 1], k[b:b + 1, :, kept[b]], v[b:b + 1, :, kept[b]])
        torch.testing.assert_close(out[b:b + 1], want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[b:b + 1], want_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and bool((lse[2] == float("-inf")).all())
    eager_out, eager_lse = joint_text._attend_text(q, k, v, kept)  # the per-sample path agrees
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, eager_lse, rtol=1e-5, atol=1e-5)


def _no_lse(q, k, v, layout):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_a_method_without_log_sum_exp_is_refused():
    attention.register_method("test-no-lse", _no_lse, overwrite=True)
    try:
        model, _, modules = _cogvideox(padded=False)
        processors = [module.processor for module in modules]
        with pytest.raises(ValueError, match="must return its log-sum-exp"):
            attention.apply(model, "test-no-lse")
        assert all(module.processor is original for module, original in zip(modules, processors))
    finally:
        attention.unregister_method("test-no-lse")


def test_dense_warmup_steps_run_the_models_own_processor():
    model, inputs, _ = _cogvideox(padded=False)
    later = dict(inputs, timestep=inputs["timestep"] - 100)
    reference, reference_later = _run(model, inputs), _run(model, later)
    attention.apply(model, "oracle", sparsity=0.8, dense_warmup_steps=1, **SPARSE)
    assert torch.equal(_run(model, inputs), reference)  # step 0 runs the original processors, bit for bit
    assert (_run(model, later) - reference_later).abs().max() > 1e-3  # step 1 runs the method
