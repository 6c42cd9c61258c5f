import pytest
import torch
from diffusers import WanTransformer3DModel

import attention
from tiny_models import randomised

LATENTS = (1, 4, 3, 8, 8)  # grid (3, 4, 4) with patch (1, 2, 2)


def _zeros(q, k, v, layout):
    return torch.zeros_like(q)


class _Recorder:
    """Test method: dense attention that records the context the adapter hands it."""

    calls: list = []
    dtypes: list = []
    resets: list = []

    def __init__(self, layer_index):
        self.layer_index = layer_index

    def __call__(self, q, k, v, layout, step):
        _Recorder.calls.append((self.layer_index, step, layout.grid, tuple(q.shape)))
        _Recorder.dtypes.append(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def reset(self):
        _Recorder.resets.append(self.layer_index)


attention.register_method("test-zeros", _zeros, overwrite=True)
attention.register_method("test-recorder", _Recorder, overwrite=True)


def _wan(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
        ffn_dim=32, num_layers=2, patch_size=(1, 2, 2), rope_max_seq_len=32,
    ).eval()


@pytest.fixture
def wan():
    model = _wan()
    torch.manual_seed(1)
    inputs = (torch.randn(LATENTS), torch.randn(1, 5, 16))
    return model, inputs


def _run(model, inputs, t=900.0):
    with torch.no_grad():
        return model(inputs[0], torch.tensor([t]), inputs[1]).sample


def _self_processors(model):
    return [block.attn1.processor for block in model.blocks]


@pytest.mark.parametrize("fused", [False, True])
def test_dense_matches_the_models_own_processors(wan, fused):
    model, inputs = wan
    if fused:
        model.fuse_qkv_projections()
    reference = _run(model, inputs)
    attention.apply(model, "dense")
    assert attention.current_method(model) == "dense"
    torch.testing.assert_close(_run(model, inputs), reference, atol=1e-5, rtol=1e-5)
    assert attention.adapter_state(model).layout.grid == (3, 4, 4)


def test_a_different_method_changes_the_output_and_remove_restores_exactly(wan):
    model, inputs = wan
    reference = _run(model, inputs)
    processors = _self_processors(model)
    cross = [block.attn2.processor for block in model.blocks]
    hooks = len(model._forward_pre_hooks)

    attention.apply(model, "test-zeros")
    assert (_run(model, inputs) - reference).abs().max() > 1e-3
    assert [block.attn2.processor for block in model.blocks] == cross

    attention.remove(model)
    assert all(a is b for a, b in zip(_self_processors(model), processors))
    assert len(model._forward_pre_hooks) == hooks
    assert attention.current_method(model) is None
    assert torch.equal(_run(model, inputs), reference)


def test_applying_twice_replaces_the_first_application(wan):
    model, inputs = wan
    reference = _run(model, inputs)
    processors = _self_processors(model)
    attention.apply(model, "test-zeros")
    attention.apply(model, "dense")
    assert attention.current_method(model) == "dense"
    assert len(model._forward_pre_hooks) == 1
    torch.testing.assert_close(_run(model, inputs), reference, atol=1e-5, rtol=1e-5)
    attention.remove(model)
    assert all(a is b for a, b in zip(_self_processors(model), processors))


def test_unknown_method_and_unsupported_model_errors(wan):
    model, _ = wan
    with pytest.raises(ValueError, match="registered methods: " + ", ".join(attention.available_methods())):
        attention.apply(model, "no-such-method")
    with pytest.raises(ValueError, match=r"no attention adapter for Linear; .*WanTransformer3DModel, VideoDiT"):
        attention.apply(torch.nn.Linear(2, 2), "dense")
    assert attention.available_methods() == sorted(attention.available_methods())


def test_option_errors_leave_the_model_untouched(wan):
    model, _ = wan
    processors = _self_processors(model)
    with pytest.raises(ValueError, match=r"'dense' does not take option\(s\) block_size, sparsity"):
        attention.apply(model, "dense", block_size=64, sparsity=0.5)
    with pytest.raises(ValueError, match="set by the adapter"):
        attention.apply(model, "test-recorder", layer_index=3)
    with pytest.raises(ValueError, match="out of range for 2"):
        attention.apply(model, "dense", dense_layers=[2])
    assert attention.current_method(model) is None
    assert all(a is b for a, b in zip(_self_processors(model), processors))


def test_layout_mismatch_raises(wan):
    model, inputs = wan
    attention.apply(model, "dense")
    _run(model, inputs)
    with torch.no_grad(), pytest.raises(ValueError, match=r"layout expects 3\*4\*4 = 48 tokens, got 7"):
        model.blocks[0].attn1(torch.randn(1, 7, 24))


def test_step_layer_index_and_resets_reach_the_method(wan):
    model, inputs = wan
    attention.apply(model, "test-recorder")
    _Recorder.calls.clear()
    _Recorder.resets.clear()
    for t in (900.0, 900.0, 800.0, 950.0):  # two passes at one step (CFG), the next step, a new generation
        _run(model, inputs, t)
    steps = [(layer, step) for layer, step, _, _ in _Recorder.calls]
    assert steps == [(0, 0), (1, 0), (0, 0), (1, 0), (0, 1), (1, 1), (0, 0), (1, 0)]
    assert {(grid, shape) for _, _, grid, shape in _Recorder.calls} == {((3, 4, 4), (1, 2, 48, 12))}
    assert _Recorder.resets == [0, 1]  # the higher timestep started a new generation
    attention.reset(model)
    assert _Recorder.resets == [0, 1, 0, 1]
    assert attention.adapter_state(model).step == 0


def test_methods_get_the_autocast_dtype_as_the_models_own_attention_does(wan):
    model, inputs = wan
    for block in model.blocks:  # CUDA autocast runs these norms in float32 (CPU autocast does not): do it here too
        for norm in (block.attn1.norm_q, block.attn1.norm_k):
            norm.register_forward_hook(lambda module, args, output: output.float())
    attention.apply(model, "test-recorder")
    _Recorder.dtypes.clear()
    _run(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(model, inputs)
    assert _Recorder.dtypes == [torch.float32] * 2 + [torch.bfloat16] * 2
    assert torch.isfinite(out).all()


def test_dense_warmup_steps_and_dense_layers(wan):
    model, inputs = wan
    reference = {t: _run(model, inputs, t) for t in (900.0, 800.0)}
    attention.apply(model, "test-zeros", dense_warmup_steps=1)
    torch.testing.assert_close(_run(model, inputs, 900.0), reference[900.0], atol=1e-5, rtol=1e-5)
    assert (_run(model, inputs, 800.0) - reference[800.0]).abs().max() > 1e-3
    attention.apply(model, "test-zeros", dense_layers=[0, -1])
    torch.testing.assert_close(_run(model, inputs, 800.0), reference[800.0], atol=1e-5, rtol=1e-5)
    attention.apply(model, "test-zeros", dense_layers=[0])
    assert (_run(model, inputs, 800.0) - reference[800.0]).abs().max() > 1e-3


def test_video_dit_dense_matches_its_own_processors():
    from t2v.models.video_dit import VideoDiT

    torch.manual_seed(0)
    model = VideoDiT(
        in_channels=3, out_channels=3, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        num_layers=2, ffn_dim=32, text_dim=16, freq_dim=16, max_frames=4, max_height=8, max_width=8,
    )
    model = randomised(model)
    video, text = torch.randn(1, 3, 3, 8, 8), torch.randn(1, 5, 16)

    def run():
        with torch.no_grad():
            return model(video, torch.tensor([700.0]), text).sample

    reference = run()
    attention.apply(model, "dense")
    torch.testing.assert_close(run(), reference, atol=1e-5, rtol=1e-5)
    assert attention.adapter_state(model).layout.grid == (3, 4, 4)
    attention.apply(model, "test-zeros")
    assert (run() - reference).abs().max() > 1e-3
    attention.remove(model)
    assert torch.equal(run(), reference)


def _tiled_dense(q, k, v, layout):
    # Same attention, computed in tile order: exercises the layout's permutations inside compiled code.
    out = torch.nn.functional.scaled_dot_product_attention(*(layout.to_tiles(x) for x in (q, k, v)))
    return layout.from_tiles(out)


def test_regional_compile_has_no_graph_breaks(wan):
    model, inputs = wan
    reference = {t: _run(model, inputs, t) for t in (900.0, 800.0, 700.0)}
    attention.register_method("test-tiled", _tiled_dense, overwrite=True)
    attention.apply(model, "test-tiled", dense_warmup_steps=1, dense_layers=[1])
    torch._dynamo.reset()
    try:
        # fullgraph=True turns any graph break in the processors into an error.
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        for t, expected in reference.items():
            torch.testing.assert_close(_run(model, inputs, t), expected, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()
