"""Block diffusion: chunk-causal attention, the KV cache, FlashBlock's cache, and BlockDiffusionPipeline end to end."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance

import attention
from attention.block_causal import chunk_causal_attention, chunk_causal_mask
from attention.kernels import merge_attention, reference
from pipelines import BlockDiffusionPipeline, load_pipeline
from t2v.data import vocabulary
from t2v.models import BlockVideoDiT, TextEncoder, VideoDiT
from t2v.models.block_dit import block_model_from

from tiny_models import TINY_DIT, randomised

# Chunks of 2 frames of 4 x 4 tokens (32 tokens), a window of 2 earlier chunks; every conditioning path switched on.
TINY_BLOCK = dict(TINY_DIT, max_frames=12, absolute_positions=True, frame_modulation=True, position_modulation=True,
                  caption_layout=True, chunk_frames=2, window_chunks=2)
PROMPT = "a red circle moves to the right on black"


def tiny_block_pipeline(guidance_scale=3.0) -> BlockDiffusionPipeline:
    transformer = randomised(BlockVideoDiT(**TINY_BLOCK))
    text_encoder = TextEncoder(vocab=vocabulary(), hidden_size=16, num_layers=1, num_heads=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in text_encoder.parameters():
            p.normal_(0.0, 0.2)
    pipe = BlockDiffusionPipeline(text_encoder.eval(), transformer, FlowMatchEulerDiscreteScheduler(shift=3.0),
                                  ClassifierFreeGuidance(guidance_scale=guidance_scale))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_block_pipeline()


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).frames


def psnr(a, b):
    return 10 * np.log10(1 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def test_lse_merge_of_two_parts_equals_attention_over_their_union_with_pooled_entries():
    torch.manual_seed(0)
    B, H, N, D, bs = 2, 3, 40, 8, 8  # 5 blocks; the last block of the external part is partial
    q = torch.randn(B, H, N, D)
    k_in, v_in = torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    k_out, v_out = torch.randn(B, H, 29, D), torch.randn(B, H, 29, D)
    pooled_k, pooled_v = torch.randn(B, H, 3, D), torch.randn(B, H, 3, D)
    log_weight = torch.randn(B, H, 5, 3)
    index, count = reference.full_block_index(5, 5, B, H)
    inside = reference.block_sparse_attention(q, k_in, v_in, index, count, block_size=bs, pooled_k=pooled_k,
                                              pooled_v=pooled_v, pooled_log_weight=log_weight)
    outside = reference.dense_attention(q, k_out, v_out)
    merged, merged_lse = merge_attention(*inside, *outside)
    # The union by definition: one softmax over the in-part keys, the pooled entries and the external keys.
    scale = D ** -0.5
    logits = torch.cat([q @ k_in.transpose(-1, -2) * scale,
                        q @ pooled_k.transpose(-1, -2) * scale + log_weight.repeat_interleave(bs, 2)[:, :, :N],
                        q @ k_out.transpose(-1, -2) * scale], -1)
    values = torch.cat([v_in, pooled_v, v_out], 2)
    torch.testing.assert_close(merged, logits.softmax(-1) @ values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse, logits.logsumexp(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 1, 2])
def test_chunk_causal_attention_equals_its_direct_definition(window):
    torch.manual_seed(0)
    chunk, chunks = 12, 4  # chunks of 12 tokens: not a multiple of any kernel block
    q, k, v = (torch.randn(2, 2, chunk * chunks, 8) for _ in range(3))
    out = chunk_causal_attention(q, k, v, chunk, window)
    chunk_of = torch.arange(chunk * chunks) // chunk
    allowed = chunk_of[None, :] <= chunk_of[:, None]
    if window is not None:
        allowed &= chunk_of[None, :] >= chunk_of[:, None] - window
    logits = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    expected = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert chunk_causal_mask(3, 1).tolist() == [[True, False, False], [True, True, False], [False, True, True]]


def test_a_block_model_of_a_trained_video_dit_matches_it_on_one_chunk():
    base = randomised(VideoDiT(**{k: v for k, v in TINY_BLOCK.items() if k not in ("chunk_frames", "window_chunks")}))
    block = block_model_from(base, chunk_frames=2, window_chunks=2)
    x, text = torch.randn(2, 3, 2, 16, 16), torch.randn(2, 5, 16)
    t = torch.tensor([700.0, 200.0])
    with torch.no_grad():
        torch.testing.assert_close(block(x, t, text).sample, base(x, t, text).sample, atol=1e-5, rtol=1e-5)
        # Over several chunks the block model is causal: later frames do not change earlier ones.
        longer = torch.cat([x, torch.randn(2, 3, 4, 16, 16)], 2)
        changed = longer.clone()
        changed[:, :, 4:] += 1
        a, b = block(longer, t, text).sample, block(changed, t, text).sample
    torch.testing.assert_close(a[:, :, :4], b[:, :, :4])
    assert (a[:, :, 4:] - b[:, :, 4:]).abs().max() > 1e-2


@pytest.mark.parametrize("context_chunks", [1, 2])
def test_the_kv_cache_of_finished_chunks_equals_recomputing_them(context_chunks):
    model = randomised(BlockVideoDiT(**TINY_BLOCK))
    frames = 2 * (context_chunks + 1)
    x = torch.randn(2, 3, frames, 16, 16)
    text = torch.randn(2, context_chunks + 1, 5, 16)  # one caption per chunk
    mask = torch.ones(2, context_chunks + 1, 5)
    mask[1, :, 3:] = 0
    t = torch.tensor([600.0, 900.0])
    with torch.no_grad():
        per_chunk = torch.cat([torch.zeros(2, context_chunks), t[:, None]], 1)
        recomputed = model(x, per_chunk, text, mask).sample[:, :, -2:]
        cache = model.new_cache()
        cache.filling = True
        model(x[:, :, :-2], torch.zeros(2), text[:, :-1], mask[:, :-1], kv_cache=cache)
        cache.filling = False
        assert cache.frames == frames - 2 and cache.layers[0].key.shape[2] == context_chunks * 32
        cached = model(x[:, :, -2:], t, text[:, -1], mask[:, -1], kv_cache=cache).sample
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)


def test_pipeline_first_chunk_equals_a_one_chunk_call_and_any_length_works(pipe):
    one = run(pipe, num_frames=2)
    long = run(pipe, num_frames=10)  # 5 chunks: longer than the window, positions stay in range
    assert one.shape == (1, 2, 16, 16, 3) and long.shape == (1, 10, 16, 16, 3)
    np.testing.assert_allclose(long[:, :2], one, atol=1e-6)
    assert np.abs(long[:, 2:4] - long[:, :2]).max() > 1e-3
    # A prompt's clip does not depend on the rest of the batch.
    both = pipe([PROMPT, "a blue square moves up"], num_frames=6, num_inference_steps=4,
                generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(5)]).frames
    np.testing.assert_allclose(both[0], run(pipe, num_frames=6)[0], atol=1e-5)


def test_pipeline_calls_back_per_chunk_and_rejects_what_it_cannot_make(pipe):
    finished = []
    frames = run(pipe, num_frames=6, callback_on_chunk_end=lambda p, j, f: finished.append((j, f)))
    assert [j for j, _ in finished] == [0, 1, 2]
    np.testing.assert_allclose(np.concatenate([f for _, f in finished], 1), frames, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 2"):
        run(pipe, num_frames=5)
    with pytest.raises(ValueError, match="one object"):
        run(pipe, prompt="a red circle moves left, then up and a blue square stays still", num_frames=6)
    with pytest.raises(ValueError, match="non-empty"):
        run(pipe, prompt=" ")


def test_a_prefix_continues_the_clip_as_if_the_pipeline_had_made_it(pipe):
    whole = run(pipe, num_frames=8, output_type="latent")
    for frames in (2, 4):  # one chunk, and two (the window): the rest is the same clip
        continued = run(pipe, num_frames=8, output_type="latent", prefix_latents=whole[:, :, :frames])
        torch.testing.assert_close(continued, whole, atol=1e-5, rtol=0)
    other = torch.rand_like(whole[:, :, :2]) * 2 - 1
    continued = run(pipe, num_frames=8, output_type="latent", prefix_latents=other)
    assert torch.equal(continued[:, :, :2], other) and (continued[:, :, 2:] - whole[:, :, 2:]).abs().max() > 1e-3
    for bad in (whole[:, :, :3], whole, whole[:, :1, :2], whole[0]):
        with pytest.raises(ValueError, match="prefix_latents"):
            run(pipe, num_frames=8, prefix_latents=bad)


def test_a_chained_prompt_conditions_each_chunk_on_its_segment(pipe):
    seen = []
    original = pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["encoder_hidden_states"])
        return original(*args, **kwargs)

    pipe.transformer.forward = spy
    try:
        chained = run(pipe, prompt="a red circle moves to the right, then up", num_frames=8, guidance_scale=1.0)
    finally:
        del pipe.transformer.forward
    first = run(pipe, prompt="a red circle moves to the right", num_frames=8, guidance_scale=1.0)
    # Chunks 0 and 1 read "... moves to the right" (as the plain prompt), chunks 2 and 3 "... moves up".
    np.testing.assert_allclose(chained[:, :4], first[:, :4], atol=1e-6)
    assert np.abs(chained[:, 4:] - first[:, 4:]).max() > 1e-3
    step_calls = [s for s in seen if s.ndim == 3]  # denoising calls (one caption); cache fills carry one per chunk
    assert not torch.equal(step_calls[0], step_calls[-1])


def test_flashblock_refreshing_every_step_equals_no_cache_and_keeps_its_schedule(pipe):
    plain = run(pipe, num_frames=8, num_inference_steps=6)
    try:
        attention.apply(pipe.transformer, "flashblock", refresh_every=1)
        np.testing.assert_allclose(run(pipe, num_frames=8, num_inference_steps=6), plain, atol=1e-5)
        attention.apply(pipe.transformer, "flashblock", refresh_every=4, exact_steps=1)
        cached = run(pipe, num_frames=8, num_inference_steps=6)
        layer = attention.adapter_state(pipe.transformer).layer_methods[0].fn
        # 3 chunks with context x 2 guidance branches x refreshes at steps 0 and 4 of 6.
        assert layer.refreshes == 3 * 2 * 2
        assert 15 < psnr(cached, plain) < 80  # close, not equal
        attention.apply(pipe.transformer, "flashblock", chunk_method="vmoba", sparsity=0.5, block_size=16,
                        refresh_every=2)
        assert run(pipe, num_frames=8).shape == (1, 8, 16, 16, 3)
    finally:
        attention.remove(pipe.transformer)
    np.testing.assert_allclose(run(pipe, num_frames=8, num_inference_steps=6), plain, atol=1e-6)


def test_sparse_methods_run_in_chunk_and_flashblock_checks_its_options(pipe):
    plain = run(pipe, num_frames=6)
    try:
        for name, options in [("dense", {}), ("vmoba", {"threshold": 1.0, "block_size": 16}),
                              ("xattention", {"threshold": 1.0, "block_size": 16})]:
            attention.apply(pipe.transformer, name, **options)  # keeping every block: the same attention
            np.testing.assert_allclose(run(pipe, num_frames=6), plain, atol=1e-4)
        with pytest.raises(ValueError, match="refresh_every"):
            attention.apply(pipe.transformer, "flashblock", refresh_every=0)
        with pytest.raises(ValueError, match="registered"):
            attention.apply(pipe.transformer, "flashblock", chunk_method="no-such-method")
        attention.register_method("no-lse", lambda q, k, v, layout: q)
        with pytest.raises(ValueError, match="log-sum-exp"):
            attention.apply(pipe.transformer, "no-lse")
    finally:
        attention.unregister_method("no-lse")
        attention.remove(pipe.transformer)


def test_save_and_load_round_trip_through_load_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "block")
    loaded = load_pipeline(tmp_path / "block", device="cpu")
    assert isinstance(loaded, BlockDiffusionPipeline)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(loaded, num_frames=6), run(pipe, num_frames=6), atol=1e-6)


def test_evaluate_long_script_compares_a_method_with_no_method_on_the_same_seeds(pipe, tmp_path):
    import importlib.util
    from pathlib import Path

    pipe.save_pretrained(tmp_path / "block")
    path = Path(__file__).resolve().parents[1] / "scripts" / "evaluate_long.py"
    spec = importlib.util.spec_from_file_location("evaluate_long_compare", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = ["--model", str(tmp_path / "block"), "--splits", "train", "--prompts", "2", "--seeds", "1",
              "--frames", "8", "--steps", "3", "--device", "cpu", "--attention", "flashblock", "--compare"]
    exact = script.main(common + ["--attention-option", "refresh_every=1"])
    assert [r.get("attention") for r in exact] == [None, "flashblock refresh_every=1"]
    assert exact[1]["n_clips"] == 2 and exact[1]["psnr_min"] > 60  # refreshing every step: no cache, exactly
    assert "psnr_mean" not in exact[0]
    kept = script.main(common + ["--attention-option", "refresh_every=3", "--attention-option", "exact_steps=0"])
    assert kept[1]["psnr_min"] < exact[1]["psnr_min"]  # a kept block-external part is an approximation


def test_a_tiny_block_model_trains_with_falling_loss_and_keeps_its_chunking(tmp_path):
    import json

    from t2v.training import TrainConfig, train
    from tiny_models import TINY_TEXT

    cfg = TrainConfig(output_dir=str(tmp_path), steps=60, batch_size=8, learning_rate=2e-3, warmup_steps=5,
                      log_every=1, save_every=1000, block=True, frames=6, long_frames=12, height=16, width=16,
                      transformer=dict(TINY_BLOCK), text_encoder=TINY_TEXT)
    final = train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert json.loads((final / "transformer" / "config.json").read_text())["_class_name"] == "BlockVideoDiT"
    model = BlockVideoDiT.from_pretrained(final / "transformer")
    assert (model.config.chunk_frames, model.config.window_chunks) == (2, 2)
    with pytest.raises(ValueError, match="windows"):
        train(TrainConfig(output_dir=str(tmp_path / "bad"), steps=1, block=True, frames=4, height=16, width=16,
                          transformer=dict(TINY_BLOCK), text_encoder=TINY_TEXT))


def test_batches_drawn_by_workers_are_block_batches_and_differ_between_workers():
    from t2v.training.block_training import worker_batches

    world = dict(frames=12, height=16, width=16, chunk_frames=2)
    options = dict(batch_size=4, window_frames=6, chunk_frames=2, caption_dropout=0.0, shift=3.0,
                   history_noise=0.05, start_share=0.5)
    next_batch = worker_batches(world, options, seed=3, workers=2, device="cpu")
    first, second = next_batch(), next_batch()
    videos, captions, t, weights = first
    assert videos.shape == (4, 3, 6, 16, 16) and t.shape == (4, 6) and weights.shape == (4, 1, 6, 1, 1)
    assert len(captions) == 4 and all(len(row) == 3 and all(row) for row in captions)
    assert videos.abs().max() <= 1 and not torch.equal(videos, second[0])  # two workers, two generators


def test_block_training_with_data_workers_runs_and_data_workers_need_block(tmp_path):
    from t2v.training import TrainConfig, train
    from tiny_models import TINY_TEXT

    cfg = TrainConfig(output_dir=str(tmp_path), steps=3, batch_size=4, warmup_steps=1, save_every=1000, block=True,
                      frames=6, long_frames=12, height=16, width=16, data_workers=1,
                      transformer=dict(TINY_BLOCK), text_encoder=TINY_TEXT)
    assert (train(cfg) / "transformer" / "config.json").exists()
    with pytest.raises(ValueError, match="data_workers"):
        train(TrainConfig(output_dir=str(tmp_path / "bad"), steps=1, data_workers=2, text_encoder=TINY_TEXT))
