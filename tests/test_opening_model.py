"""The block pipeline's optional opening model: a bidirectional model makes a clip's first frames, the block model
continues from them; load_pipeline attaches the one a block folder names."""

import json
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import attention
from pipelines import BlockDiffusionPipeline, load_pipeline
from pipelines.loading import TRAINED_ATTENTION_FILE, resolve_model_path, trained_attention, trained_opening_model
from t2v.models import VideoDiT
from test_benchmark_scripts import load_script
from test_block_diffusion import PROMPT, tiny_block_pipeline
from test_pipeline import tiny_pipeline

STEPS = 4


def noise(frames=8):
    return torch.randn(1, 3, frames, 16, 16, generator=torch.Generator().manual_seed(3))


def clip(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt, num_frames=8, num_inference_steps=STEPS, latents=noise(), output_type="latent",
                **kwargs).frames


def test_the_opening_model_makes_the_first_frames_and_the_block_model_continues():
    pipe, dense = tiny_block_pipeline(), tiny_pipeline()
    alone = clip(pipe)
    # The reference: the dense pipeline under the block pipeline's guider and schedule, then a prefix.
    dense.guider, dense.scheduler = pipe.guider, FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    start = dense(PROMPT, num_frames=4, num_inference_steps=STEPS, latents=noise()[:, :, :4],
                  output_type="latent").frames
    expected = clip(pipe, prefix_latents=start)
    pipe.set_opening_model(dense.transformer, dense.text_encoder, 4)
    chunks = []
    got = clip(pipe, callback_on_chunk_end=lambda p, j, frames: chunks.append((j, frames.shape)))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - alone).abs().max() > 1e-3 and torch.equal(got[:, :, :4], start)
    assert [j for j, _ in chunks] == [0, 1, 2, 3] and chunks[0][1] == (1, 2, 16, 16, 3)
    steps = []
    clip(pipe, callback_on_step_end=lambda p, i, t, kwargs: steps.append((p is pipe, kwargs["latents"].shape[2]))
         or kwargs)
    assert steps == [(False, 4)] * STEPS + [(True, 2)] * 2 * STEPS  # the opening's steps, then two chunks'
    # The opening reads the first caption segment; where that segment is shorter than the opening (here 4 of 8
    # frames against 6), or the clip is, the block model makes the whole clip.
    chained = "a red circle moves to the right, then up"
    assert pipe.opening_frames_for(8, [[0, 0, 1, 1]]) == 4 and pipe.opening_frames_for(2, [[0]]) == 0
    pipe.set_opening_model(dense.transformer, dense.text_encoder, 6)
    assert pipe.opening_frames_for(8, [[0, 0, 1, 1]]) == 0
    torch.testing.assert_close(clip(pipe, chained), clip(tiny_block_pipeline(), chained), rtol=0, atol=0)


def test_an_opening_model_is_checked():
    pipe, dense = tiny_block_pipeline(), tiny_pipeline()
    with pytest.raises(ValueError, match="text encoder"):
        pipe.set_opening_model(dense.transformer, None, 4)
    with pytest.raises(ValueError, match="multiple of the chunk"):
        pipe.set_opening_model(dense.transformer, dense.text_encoder, 3)
    other = VideoDiT(**{**dense.transformer.config, "in_channels": 4})
    with pytest.raises(ValueError, match="in_channels"):
        pipe.set_opening_model(other, dense.text_encoder, 4)
    assert pipe.opening_transformer is None and pipe.config.opening_frames is None


def test_save_load_and_load_pipeline_attach_the_opening_model(tmp_path):
    pipe, dense = tiny_block_pipeline(), tiny_pipeline()
    pipe.set_opening_model(dense.transformer, dense.text_encoder, 4)
    expected = clip(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = load_pipeline(tmp_path / "saved", device="cpu")
    assert loaded.config.opening_frames == 4
    torch.testing.assert_close(clip(loaded), expected)

    # A block folder names its opening model in attention_config.json.
    dense.save_pretrained(tmp_path / "dense")
    pipe.set_opening_model(None)
    pipe.save_pretrained(tmp_path / "block")
    config = {"opening_model": {"model": str(tmp_path / "dense"), "frames": 4}}
    (tmp_path / "block" / TRAINED_ATTENTION_FILE).write_text(json.dumps(config))
    assert trained_opening_model(tmp_path / "block") == (str(tmp_path / "dense"), 4)
    assert trained_attention(tmp_path / "block") is None  # no method named: the model's own attention
    attached = load_pipeline(tmp_path / "block", device="cpu")
    assert isinstance(attached, BlockDiffusionPipeline) and attached.config.opening_frames == 4
    torch.testing.assert_close(clip(attached), expected)
    with_method = load_pipeline(tmp_path / "block", attention="flashblock", device="cpu")  # kept with a method
    assert with_method.opening_transformer is not None
    assert attention.current_method(with_method.transformer) == "flashblock"
    assert attention.current_method(with_method.opening_transformer) is None

    (tmp_path / "dense" / TRAINED_ATTENTION_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only by BlockDiffusionPipeline"):
        load_pipeline(tmp_path / "dense", device="cpu")
    (tmp_path / "block" / TRAINED_ATTENTION_FILE).write_text(json.dumps({"opening_model": {"model": "x"}}))
    with pytest.raises(ValueError, match="cannot read"):
        load_pipeline(tmp_path / "block", device="cpu")
    (tmp_path / "block" / TRAINED_ATTENTION_FILE).write_text(json.dumps(config))
    shutil.rmtree(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="unknown model"):
        load_pipeline(tmp_path / "block", device="cpu")


def test_evaluate_long_runs_with_and_without_the_opening_model(tmp_path):
    pipe, dense = tiny_block_pipeline(), tiny_pipeline()
    pipe.set_opening_model(dense.transformer, dense.text_encoder, 4)
    pipe.save_pretrained(tmp_path / "block")
    script = load_script("evaluate_long")
    common = ["--model", str(tmp_path / "block"), "--splits", "train", "--prompts", "2", "--seeds", "1",
              "--frames", "8", "--steps", "3", "--device", "cpu", "--json", str(tmp_path / "long.json")]
    with_opening = script.main(common)[0]
    without = script.main(common + ["--without-opening-model"])[0]
    assert with_opening["opening_frames"] == 4 and without["opening_frames"] is None
    assert with_opening["flicker"] != without["flicker"]


def test_the_shipped_block_model_opens_with_t2v_tiny():
    assert trained_opening_model(resolve_model_path("t2v-tiny-block")) == ("t2v-tiny", 16)
    pipe = load_pipeline("t2v-tiny-block", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.opening_transformer.config.sample_frames == 16  # the dense model's trained length
    frames = pipe("a red circle moves to the right", num_frames=20, num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 20, 32, 32, 3)
