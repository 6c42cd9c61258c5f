"""VMoBA: partitions, global threshold selection, exactness at threshold 1, models, training, pipeline and CLI."""

import warnings

import pytest
import torch
from diffusers import WanTransformer3DModel

import attention
from attention.layout import VideoLayout
from attention.methods.block_sparse import method_density
from attention.methods.vmoba import VMoBAMethod, chunk_of_block, partition_layout, partition_tile, select_pairs
from t2v.training.attention_finetune import apply_training_attention
from tiny_models import randomised

pytestmark = pytest.mark.filterwarnings("ignore:block-sparse attention. no Triton kernel")

GRID, BS = (4, 4, 4), 8
# Chunk of token (f, h, w) in each partition for GRID: a frame, a 1x2 column through all frames, a 2x2x2 cube.
CHUNK = {0: lambda f, h, w: f, 1: lambda f, h, w: (h, w // 2), 2: lambda f, h, w: (f // 2, h // 2, w // 2)}


def test_each_partition_tiles_the_grid_its_own_way_and_layers_cycle_through_them():
    assert [partition_tile(GRID, BS, p) for p in range(3)] == [(1, 2, 4), (4, 1, 2), (2, 2, 2)]
    assert [partition_tile((16, 8, 8), 64, p) for p in range(3)] == [(1, 8, 8), (16, 2, 2), (4, 4, 4)]
    assert [VMoBAMethod(layer_index=i).partition for i in range(8)] == [0, 1, 2, 0, 1, 2, 0, 1]
    layout = partition_layout(GRID, BS, 0)
    assert chunk_of_block(layout, 0)[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # two blocks make a frame


@pytest.mark.parametrize("layer_index", [0, 1, 2, 3, 4, 5])
def test_each_partition_reads_own_chunk_plus_the_chunk_the_scores_point_to(layer_index):
    # Keys are 0 but in the chunk holding token (3, 3, 3); queries are 0 but token (0, 0, 0). With v the identity,
    # the output row of a query is its attention over the keys: nonzero exactly where it reads.
    chunk, tile = CHUNK[layer_index % 3], partition_tile(GRID, BS, layer_index % 3)
    coords = [(f, h, w) for f in range(4) for h in range(4) for w in range(4)]  # row-major token order
    q, k, v = torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64), torch.eye(64).view(1, 1, 64, 64)
    q[..., 0, 0] = 1.0
    k[..., [i for i, c in enumerate(coords) if chunk(*c) == chunk(3, 3, 3)], 0] = 3.0
    method = VMoBAMethod(layer_index=layer_index, block_size=BS, threshold=0.25)
    reads = method(q, k, v, VideoLayout(GRID, block_size=BS))[0, 0] > 0

    def query_block(f, h, w):
        return f // tile[0], h // tile[1], w // tile[2]

    # Every token's block reads its own chunk; the block of token (0, 0, 0) also reads the hot chunk, and nothing
    # else is worth anything.
    expected = [[chunk(*a) == chunk(*b) or (query_block(*a) == query_block(0, 0, 0) and chunk(*b) == chunk(3, 3, 3))
                 for b in coords] for a in coords]
    assert reads.tolist() == expected


# One head, two query blocks, three chunks; each query's own chunk is on the diagonal.
SCORES = torch.tensor([[4.0, 2.0, 0.0], [1.0, 3.0, 2.4]])
OWN = torch.tensor([[True, False, False], [False, True, False]])


@pytest.mark.parametrize("threshold, kept", [
    # Min-max over the head: masses [[1, .5, 0], [.25, .75, .6]], total 3.1, own chunks 1.75 (56%).
    (0.5, []),                              # own chunks suffice
    (0.7, [(1, 2)]),                        # 1.75 + .6 = 2.35 >= 2.17
    (0.8, [(1, 2), (0, 1)]),                # + .5 = 2.85 >= 2.48
    (0.95, [(1, 2), (0, 1), (1, 0)]),       # + .25 = 3.1 >= 2.945; the zero-mass pair is not needed
    (1.0, [(1, 2), (0, 1), (1, 0), (0, 2)]),  # everything: dense
])
def test_threshold_keeps_the_fewest_top_pairs_whose_share_reaches_it(threshold, kept):
    expected = OWN.clone()
    for pair in kept:
        expected[pair] = True
    assert torch.equal(select_pairs(SCORES, OWN, threshold), expected)
    assert torch.equal(select_pairs(SCORES.expand(2, 3, 2, 3), OWN, threshold), expected.expand(2, 3, 2, 3))


def test_global_selection_differs_from_per_query_selection():
    # Row by row, query 0 has only 67% in its own chunk and needs chunk 1; across the head its pair is weaker.
    assert select_pairs(SCORES, OWN, 0.7).tolist() == [[True, False, False], [False, True, True]]
    assert select_pairs(SCORES, OWN, 0.7, per_query=True).tolist() == [[True, True, False], [False, True, True]]


def test_pairs_weigh_by_query_tokens_and_sparsity_keeps_a_share():
    # Query 1 stands for a quarter of the tokens: its pair (1, 2) drops below query 0's (0, 1).
    weighted = select_pairs(SCORES, OWN, 0.7, weights=torch.tensor([8, 2]))
    assert weighted.tolist() == [[True, True, False], [False, True, False]]
    assert select_pairs(SCORES, OWN, sparsity=0.5).tolist() == [[True, False, False], [False, True, True]]
    assert torch.equal(select_pairs(SCORES, OWN, sparsity=0.0), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("layer_index", [0, 1, 2])
def test_score_group_one_scores_pairs_by_the_exact_attention_mass_of_each_chunk(layer_index, monkeypatch):
    import attention.methods.vmoba as vmoba

    seen = []
    monkeypatch.setattr(vmoba, "select_pairs", lambda scores, *a, **kw: seen.append(scores) or select_pairs(
        scores, *a, **kw))
    layout = partition_layout(GRID, BS, layer_index % 3)
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    VMoBAMethod(layer_index=layer_index, block_size=BS, sparsity=0.5, score_group=1).select(q, k, k, layout)
    chunk = chunk_of_block(layout, layer_index % 3)[0].repeat_interleave(BS)  # each token's chunk
    p = (q @ k.transpose(-1, -2) * 16 ** -0.5).softmax(-1)
    per_chunk = torch.stack([p[..., chunk == c].sum(-1) for c in range(int(chunk.max()) + 1)], -1)
    expected = per_chunk.unflatten(2, (-1, BS)).mean(3)  # averaged over each query block's tokens
    torch.testing.assert_close(seen[0], expected)


def test_options_are_checked():
    for bad in (3, 0, 2.5, True):
        with pytest.raises(ValueError, match="score_group"):
            VMoBAMethod(block_size=8, score_group=bad)
    with pytest.raises(ValueError, match="threshold or sparsity"):
        VMoBAMethod(threshold=0.3, sparsity=0.5)
    with pytest.raises(ValueError, match="threshold must be in"):
        VMoBAMethod(threshold=0.0)
    assert VMoBAMethod().threshold == 0.25


@pytest.mark.parametrize("layer_index", [0, 1, 2])
def test_threshold_one_equals_dense_attention_on_an_uneven_grid(layer_index):
    torch.manual_seed(layer_index)
    layout = VideoLayout((3, 5, 7), block_size=16)  # tile (2, 4, 2): edge tiles and a mixed tail
    q, k, v = (torch.randn(2, 3, 105, 8) for _ in range(3))
    method = VMoBAMethod(layer_index=layer_index, block_size=16, threshold=1.0)
    out = method(q, k, v, layout)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - reference).norm() / reference.norm() < 1e-5
    assert method.density() == 1.0


def test_gradients_flow_through_the_selected_blocks():
    torch.manual_seed(0)
    layout = VideoLayout(GRID, block_size=BS)
    q, k, v = (torch.randn(1, 2, 64, 8, requires_grad=True) for _ in range(3))
    method = VMoBAMethod(layer_index=2, block_size=BS, threshold=0.25)
    method(q, k, v, layout).square().sum().backward()
    assert method.density() < 1.0
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def _video_dit():
    from t2v.models.video_dit import VideoDiT

    torch.manual_seed(0)
    model = VideoDiT(
        in_channels=3, out_channels=3, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        num_layers=3, ffn_dim=32, text_dim=16, freq_dim=16, max_frames=8, max_height=8, max_width=8,
    )
    return randomised(model), (torch.randn(1, 3, 6, 8, 8), torch.randn(1, 5, 16))


def _wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
        ffn_dim=32, num_layers=3, patch_size=(1, 2, 2), rope_max_seq_len=32,
    ).eval()
    return model, (torch.randn(1, 4, 6, 8, 8), torch.randn(1, 5, 16))


@pytest.mark.parametrize("build", [_video_dit, _wan])
def test_apply_on_models_is_dense_at_threshold_one_and_sparse_below(build):
    model, (latents, text) = build()

    def run():
        with torch.no_grad():
            return model(latents, torch.tensor([700.0]), text).sample

    reference = run()
    attention.apply(model, "vmoba", threshold=1.0, block_size=BS)  # grid (6, 4, 4): 12 blocks
    torch.testing.assert_close(run(), reference, atol=1e-5, rtol=1e-5)
    attention.apply(model, "vmoba", threshold=0.1, block_size=BS)
    assert (run() - reference).abs().max() > 1e-3
    assert method_density(model) < 0.5
    assert [m.fn.partition for m in attention.adapter_state(model).layer_methods] == [0, 1, 2]


def test_training_with_vmoba_reaches_the_attention_weights():
    model, (latents, text) = _video_dit()
    apply_training_attention(model, "vmoba", {"threshold": 0.25, "block_size": BS})
    assert method_density(model) is None  # the probe left no tally behind
    model.train()
    model(latents, torch.tensor([500.0]), text).sample.square().mean().backward()
    grad = model.blocks[0].attn1.to_q.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_training_probe_runs_in_the_dtype_training_hands_the_method(monkeypatch):
    from attention.kernels import dispatch

    monkeypatch.setattr(dispatch, "_warned", set())
    model, _ = _video_dit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as training's mixed precision runs it
            apply_training_attention(model, "vmoba", {"threshold": 0.25, "block_size": BS})
    fallbacks = [str(w.message) for w in caught if "PyTorch reference" in str(w.message)]
    assert len(fallbacks) == 1 and "bfloat16" in fallbacks[0]  # this CPU has no Triton kernel: said before training
    assert next(model.parameters()).dtype == torch.float32  # only the probe's inputs take the dtype


def test_training_refuses_methods_without_a_backward():
    class NoBackward:
        supports_backward = False

        def __call__(self, q, k, v, layout):
            return q

    attention.register_method("test-no-backward", NoBackward, overwrite=True)
    attention.register_method("test-detached", lambda q, k, v, layout: q.detach(), overwrite=True)
    model, _ = _video_dit()
    with pytest.raises(ValueError, match="'test-no-backward' cannot train: it has no backward pass"):
        apply_training_attention(model, "test-no-backward", {})
    with pytest.raises(ValueError, match="'test-detached' cannot train: its output is not differentiable"):
        apply_training_attention(model, "test-detached", {})
    assert attention.current_method(model) is None


def test_pipeline_and_cli_take_vmoba_options(tmp_path, monkeypatch):
    import pipelines
    from t2v.cli import main

    pipe = pipelines.load_pipeline(attention="vmoba", threshold=0.25, device="cpu")
    methods = [m.fn for m in attention.adapter_state(pipe.transformer).layer_methods]
    assert [m.threshold for m in methods] == [0.25] * 8 and [m.partition for m in methods[:4]] == [0, 1, 2, 0]

    loaded = []
    original = pipelines.load_pipeline
    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **kw: loaded.append(original(*a, **kw)) or loaded[-1])
    out = tmp_path / "vmoba.mp4"
    code = main(["generate", "a red circle moves to the right on black", "-o", str(out), "--steps", "2",
                 "--frames", "8", "--device", "cpu", "--attention", "vmoba", "--attention-option", "threshold=0.3"])
    assert code == 0 and out.stat().st_size > 0
    state = attention.adapter_state(loaded[0].transformer)
    assert state.method == "vmoba" and {m.fn.threshold for m in state.layer_methods} == {0.3}
    assert 0.0 < method_density(loaded[0].transformer) < 1.0
