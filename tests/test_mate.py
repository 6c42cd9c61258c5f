"""LinGen's MATE mixer: Rotary Major Scan, the swin window selection, the MATE model (conversion from a VideoDiT,
training, save/load) and the shipped variant end to end."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention.kernels.linear_scan import chunked_linear_scan
from attention.swin_window import fitted_window, temporal_swin_attention, window_ids
from t2v.models import MateVideoDiT, VideoDiT
from t2v.models.mate import SCAN_ORDERS, rotary_major_order
from t2v.models.mate_dit import mate_model_from
from t2v.training import TrainConfig, train

from tiny_models import TINY_DIT, TINY_TEXT, randomised

TINY_MATE = dict(TINY_DIT, max_frames=16, mate_window=(2, 2, 2), mate_state_size=8, mate_review_tokens=2,
                 mate_chunk_size=16)


@pytest.mark.parametrize("grid", [(3, 4, 5), (1, 2, 7)])
def test_rotary_major_scan_orders_invert_and_put_each_axis_innermost_in_turn(grid):
    tokens = torch.arange(int(np.prod(grid)))
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    innermost = []
    for layer in range(len(SCAN_ORDERS)):
        order, inverse = rotary_major_order(grid, layer)
        assert torch.equal(tokens[order][inverse], tokens) and sorted(order.tolist()) == tokens.tolist()
        step = coords[order][1] - coords[order][0]  # the first step of the scan moves along the innermost axis
        innermost.append(int(step.abs().argmax()))
    assert rotary_major_order(grid, 3)[0].equal(rotary_major_order(grid, 0)[0])
    if min(grid) > 1:  # columns, rows, then frames innermost
        assert innermost == [2, 1, 0]


@pytest.mark.parametrize("grid,window,shifted", [((4, 4, 4), (2, 2, 2), False), ((4, 4, 4), (2, 2, 2), True),
                                                  ((6, 4, 8), (4, 4, 4), True), ((3, 5, 4), (2, 2, 4), False)])
def test_swin_selection_equals_the_direct_window_mask(grid, window, shifted):
    torch.manual_seed(sum(grid))
    n = int(np.prod(grid))
    q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) for _ in range(3))
    size = fitted_window(grid, window)
    assert all(g % w == 0 and w <= max(1, a) for g, w, a in zip(grid, size, window))
    # Direct definition: shifted coordinates (cyclic), then floor division by the window.
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    shift = torch.tensor([w // 2 if shifted else 0 for w in size])
    cell = (coords + shift) % torch.tensor(grid) // torch.tensor(size)
    mask = (cell[:, None] == cell[None]).all(-1)
    assert torch.equal(mask, window_ids(grid, window, shifted)[:, None] == window_ids(grid, window, shifted)[None])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = temporal_swin_attention(q, k, v, grid, window, shifted)
    assert ((got - expected).norm() / expected.norm()) < 1e-10
    if shifted and min(size) > 1:
        assert not torch.equal(window_ids(grid, window, True), window_ids(grid, window, False))


def _tiny_inputs(frames=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, frames, 16, 16, generator=g), torch.tensor([500.0, 200.0]),
            torch.randn(2, 5, 16, generator=g))


def _direction_reference(branch, xbc, dt, direction):
    """One scan direction by its definition, over inputs already in that direction's order."""
    conv = branch.conv[direction]
    xbc = F.silu(conv(F.pad(xbc.transpose(1, 2), (conv.kernel_size[0] - 1, 0))).transpose(1, 2))
    x, b, c = xbc.split([branch.inner, branch.state_size, branch.state_size], -1)
    x = x.unflatten(-1, (branch.heads, -1)).transpose(1, 2)
    dt = F.softplus(dt + branch.dt_bias[direction]).transpose(1, 2)
    log_decay = -dt * torch.exp(branch.A_log[direction])[:, None]
    heads = (-1, branch.heads, -1, -1)
    y, _ = chunked_linear_scan(c[:, None].expand(*heads), b[:, None].expand(*heads), x * dt[..., None], log_decay,
                               chunk_size=5)
    return (y + x * branch.D[:, None, None]).transpose(1, 2).flatten(2)


def _mamba_reference(branch, hidden, grid):
    """The MA-branch by its definition: gather into the layer's scan order, review tokens as segment means, both
    scans over [review, scan, review], gate, norm, project, gather back."""
    order, inverse = rotary_major_order(grid, branch.layer_index)
    scanned = hidden[:, order]
    segment = torch.arange(scanned.shape[1]) * branch.review_count // scanned.shape[1]
    review = torch.stack([scanned[:, segment == i].mean(1) for i in range(branch.review_count)], 1) + branch.review
    sequence = torch.cat([review, scanned, review], 1)
    z, xbc, dt = sequence @ branch.in_proj.weight.T + branch.in_proj.bias, None, None
    z, xbc, dt = z.split([branch.inner, branch.inner + 2 * branch.state_size, 2 * branch.heads], -1)
    dt_f, dt_b = dt.chunk(2, -1)
    both = (_direction_reference(branch, xbc, dt_f, 0)
            + _direction_reference(branch, xbc.flip(1), dt_b.flip(1), 1).flip(1))
    y = branch.norm(both * F.silu(z))
    r = branch.review_count
    return branch.out_proj(y[:, r:-r])[:, inverse]


@pytest.mark.parametrize("grid,layer", [((3, 4, 5), 0), ((3, 4, 5), 1), ((2, 3, 7), 2), ((5, 1, 3), 1)])
def test_mamba_branch_equals_its_definition_with_gradients(grid, layer):
    from t2v.models.mate import MambaBranch

    torch.manual_seed(layer)
    branch = MambaBranch(24, 2, state_size=8, review_tokens=3, layer_index=layer, chunk_size=8).double()
    with torch.no_grad():
        branch.out_proj.weight.normal_(0, 0.2)
        branch.review.normal_()
    hidden = torch.randn(2, int(np.prod(grid)), 24, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, int(np.prod(grid)), 24, dtype=torch.float64)
    expected = _mamba_reference(branch, hidden, grid)
    got = branch(hidden, grid)
    # Float64, but the chunked scan's decay ratios amplify the summation-order differences of the review tokens.
    assert ((got - expected).norm() / expected.norm()) < 1e-7
    torch.testing.assert_close(branch(hidden, grid, residual=residual), got + residual)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), hidden)
    (g_got,) = torch.autograd.grad(got.square().sum(), hidden)
    assert ((g_got - g_expected).norm() / g_expected.norm()) < 1e-7
    with pytest.raises(ValueError, match="grid"):
        branch(hidden[:, 1:], grid)


@pytest.mark.parametrize("shifted", [False, True])
def test_swin_processor_equals_windowed_attention_of_the_modules_own_q_k_v(shifted):
    from attention.adapters.wan_style import project_qkv
    from t2v.models.mate import TemporalSwinProcessor, _Holder

    dit = randomised(VideoDiT(**TINY_DIT)).double()
    attn, grid, window = dit.blocks[0].attn1, (4, 4, 6), (2, 2, 4)
    video = torch.randn(1, 3, 4, 16, 24, dtype=torch.float64)  # patches of 4 x 4: the grid above
    rotary = dit.rope(video)
    hidden = torch.randn(1, int(np.prod(grid)), attn.heads * 12, dtype=torch.float64)
    holder = _Holder()
    holder.grid = grid
    q, k, v = project_qkv(attn, hidden, rotary)
    out = temporal_swin_attention(q, k, v, grid, window, shifted).transpose(1, 2).flatten(2, 3)
    expected = attn.to_out[0](out)
    got = TemporalSwinProcessor(holder, window, shifted)(attn, hidden, rotary_emb=rotary)
    assert ((got - expected).norm() / expected.norm()) < 1e-10


def test_a_converted_video_dit_keeps_its_weights_and_starts_as_windowed_attention():
    dit = randomised(VideoDiT(**TINY_DIT))
    mate = mate_model_from(dit, max_frames=16, mate_window=(4, 8, 8), mate_state_size=8, mate_review_tokens=2,
                           mate_chunk_size=16).eval()
    video, t, text = _tiny_inputs()
    # Windows covering the whole 4 x 8 x 8 grid and the closed Mamba branch: exactly the VideoDiT.
    with torch.no_grad():
        torch.testing.assert_close(mate(video, t, text).sample, dit(video, t, text).sample, rtol=1e-4, atol=1e-5)
    # Opening the Mamba branch changes the output: it is in the path.
    with torch.no_grad():
        for block in mate.blocks:
            block.attn1.mamba.out_proj.weight.normal_(0, 0.2)
        assert (mate(video, t, text).sample - dit(video, t, text).sample).abs().max() > 1e-3


def test_mate_model_takes_longer_clips_and_gradients_reach_both_branches():
    mate = randomised(MateVideoDiT(**TINY_MATE))
    video, t, text = _tiny_inputs(frames=12)
    out = mate(video, t, text).sample
    assert out.shape == video.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    block = mate.blocks[1].attn1
    assert block.mamba.A_log.grad.abs().sum() > 0 and block.mamba.in_proj.weight.grad.abs().sum() > 0
    assert block.temporal.to_q.weight.grad.abs().sum() > 0 and block.mamba.review.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="outside"):
        block(torch.randn(1, 4, 24))


def test_a_tiny_mate_model_trains_with_falling_loss_and_round_trips(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), steps=60, batch_size=8, learning_rate=2e-3, warmup_steps=5,
                      log_every=1, save_every=1000, frames=4, height=16, width=16, mixer="mate",
                      transformer=dict(TINY_MATE), text_encoder=TINY_TEXT)
    final = train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert json.loads((final / "transformer" / "config.json").read_text())["_class_name"] == "MateVideoDiT"
    model = MateVideoDiT.from_pretrained(final / "transformer").eval()
    model.save_pretrained(tmp_path / "again")
    again = MateVideoDiT.from_pretrained(tmp_path / "again").eval()
    video, t, text = _tiny_inputs()
    with torch.no_grad():
        assert torch.equal(model(video, t, text).sample, again(video, t, text).sample)
    with pytest.raises(ValueError, match="MATE"):
        train(TrainConfig(output_dir=str(tmp_path / "bad"), steps=1, mixer="mate", attention="vmoba",
                          transformer=dict(TINY_MATE), text_encoder=TINY_TEXT, frames=4, height=16, width=16))


def test_attention_methods_refuse_a_mate_model():
    import attention

    with pytest.raises(ValueError):
        attention.apply(MateVideoDiT(**TINY_MATE), "vmoba")


def test_the_shipped_mate_variant_loads_and_generates_end_to_end():
    from pipelines import load_pipeline
    from pipelines.loading import available_models

    assert "t2v-tiny-mate" in available_models()
    pipe = load_pipeline("t2v-tiny-mate", device="cpu")
    assert isinstance(pipe.transformer, MateVideoDiT)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a red circle moves to the right on black", num_frames=20, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 20, 32, 32, 3) and np.isfinite(frames).all() and frames.std() > 0.01
    with pytest.raises(ValueError, match="frames"):
        pipe("a red circle moves to the right", num_frames=132, num_inference_steps=1)
