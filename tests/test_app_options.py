"""The demo's generate function passes attention options and guidance strengths through (no browser needed)."""

import sys
from pathlib import Path

import gradio as gr
import attention
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import app  # noqa: E402


def no_progress(*args, **kwargs):
    return None


def test_attention_options_and_guidance_strengths_reach_the_pipeline():
    path, status = app.generate("a red circle moves to the right", 0, 2, 4, "t2v-tiny", "vmoba", "threshold=0.3",
                                ["temporal-self-guidance", "fourier-motion"], 5.0, 0.4, 1.0, progress=no_progress)
    assert Path(path).stat().st_size > 0 and "2 steps" in status
    pipe = app.get_pipeline("t2v-tiny", "vmoba", (("threshold", 0.3),))
    layer = attention.adapter_state(pipe.transformer).layer_methods[0].fn
    assert layer.threshold == 0.3


def test_bad_attention_option_is_shown_as_an_error():
    for options, message in (("threshold=5", "threshold"), ("threshold", "key=value")):
        with pytest.raises(gr.Error, match=message):
            app.generate("a red circle", 0, 2, 4, "t2v-tiny", "vmoba", options, [], 5.0, 0.6, 0.5,
                         progress=no_progress)


def test_a_variant_runs_with_the_attention_it_was_fine_tuned_with():
    path, _ = app.generate("a green square shrinks on gray", 0, 2, 4, "t2v-tiny-vmoba", app.MODEL_ATTENTION, "", [],
                           5.0, 0.6, 0.5, progress=no_progress)
    assert Path(path).stat().st_size > 0
    assert attention.current_method(app.get_pipeline("t2v-tiny-vmoba", None, ()).transformer) == "vmoba"
    assert attention.current_method(app.get_pipeline("t2v-tiny", None, ()).transformer) is None


def test_picking_a_model_sets_the_slider_to_its_own_guidance_scale(monkeypatch):
    assert app.model_guidance_scale("t2v-tiny") == app.model_guidance_scale("t2v-tiny-vmoba") == 2.5
    # The shipped models share a scale today; a variant tuned at its own must still get its own.
    monkeypatch.setattr(app.get_pipeline("t2v-tiny-vmoba", None, ()).guider, "guidance_scale", 4.0)
    assert app.model_guidance_scale("t2v-tiny-vmoba") == 4.0
    assert app.model_guidance_scale("t2v-tiny") == 2.5
    demo = app.build_demo()
    picks = [d for d in demo.config["dependencies"] if any(t[1] == "change" for t in d["targets"])]
    components = {c["id"]: c["props"].get("elem_id") for c in demo.config["components"]}
    assert [(components[p["inputs"][0]], components[p["outputs"][0]]) for p in picks] == [("model", "guidance-scale")]


def test_a_block_model_streams_its_chunks_and_sets_the_frames_slider(monkeypatch):
    from test_block_diffusion import tiny_block_pipeline

    block = tiny_block_pipeline()
    monkeypatch.setattr(app, "get_pipeline", lambda model, method, options=(): block)
    updates = list(app.generate_stream("a red circle moves to the right", 0, 2, 6, "block", app.MODEL_ATTENTION, "",
                                       [], 3.0, 0.6, 0.5, progress=no_progress))
    # Chunks of 2 frames: the first two chunks are shown as they come, then the whole clip.
    assert [status.split(" of ")[0] for _, status in updates[:2]] == ["2", "4"]
    assert "6 frames of 16x16" in updates[-1][1]
    assert all(Path(path).stat().st_size > 0 for path, _ in updates)
    scale, frames = app.pick_model("block", 15)
    assert scale == 3.0 and frames["step"] == 2 and frames["maximum"] == app.LONG_FRAMES and frames["value"] == 14


def test_a_block_models_opening_counts_in_the_progress(monkeypatch):
    from test_block_diffusion import tiny_block_pipeline
    from test_pipeline import tiny_pipeline

    block, dense = tiny_block_pipeline(), tiny_pipeline()
    block.set_opening_model(dense.transformer, dense.text_encoder, 4)
    monkeypatch.setattr(app, "get_pipeline", lambda model, method, options=(): block)
    seen = []
    updates = list(app.generate_stream("a red circle moves to the right", 0, 2, 6, "block", app.MODEL_ATTENTION, "",
                                       [], 3.0, 0.6, 0.5, progress=lambda value, desc=None: seen.append(value)))
    # The opening makes chunks 0 and 1 in 2 steps (2 chunks' worth each), then chunk 2 takes 2 steps: 6 of 6.
    assert seen == [(2, 6), (4, 6), (5, 6), (6, 6)]
    assert [status.split(" of ")[0] for _, status in updates[:2]] == ["2", "4"] and "6 frames" in updates[-1][1]
