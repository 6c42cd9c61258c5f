"""Guidance where the model fails: the windowed self-guidance reference, the diffusers guiders, longer per-frame
tables, the turn-back reading of the scorer, and the regime evaluation script."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from t2v.data import render_long
from t2v.data.long_clips import sample_long_specs
from t2v.eval.long_clips import score_long_clip
from t2v.guidance import get_guidance
from t2v.guidance.guiders import FourierMotionGuider, TemporalSelfGuider
from t2v.guidance.temporal_maps import attention_with_frame_mass, frame_mass
from t2v.guidance.temporal_self_guidance import windowed
from t2v.models.video_dit import with_max_frames
from test_guidance import tiny_guidance_pipeline

PROMPT = "a red circle moves to the right on black"


def tiny_pipe():
    return tiny_guidance_pipeline(frame_modulation=True)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


def run(pipe, guidance=(), **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(PROMPT, guidance=list(guidance), generator=torch.Generator().manual_seed(0),
                output_type="latent", **kwargs).frames


def test_windowed_masses_attend_only_inside_the_window():
    torch.manual_seed(1)
    frames, per_frame, span = 7, 5, 3  # an odd span and a window that stops at both ends of the clip
    q, k, v = (torch.randn(2, 2, frames * per_frame, 8) * 2 for _ in range(3))
    mass = frame_mass(q, k, frames)
    kept = windowed(mass, span)
    assert torch.allclose(kept.sum(-1), torch.ones_like(kept.sum(-1)))
    query_frame = torch.arange(frames * per_frame) // per_frame
    start = (query_frame - span // 2).clamp(0, frames - span)
    key_frame = torch.arange(frames * per_frame) // per_frame
    allowed = (key_frame[None] >= start[:, None]) & (key_frame[None] < start[:, None] + span)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    got = attention_with_frame_mass(q, k, v, frames, kept)
    assert (got - expected).norm() / expected.norm() < 1e-5
    assert windowed(mass, frames) is mass  # a window as long as the clip changes nothing


def test_window_reference_acts_only_past_the_span(pipe):
    plain = run(pipe, num_frames=6)
    short = get_guidance("temporal-self-guidance", reference="window", strength=1.0, steps=1.0, span=6)
    assert torch.allclose(run(pipe, [short], num_frames=6), plain, atol=1e-5)  # the window is the whole clip
    windowed_run = run(pipe, [get_guidance("temporal-self-guidance", reference="window", strength=1.0, steps=1.0)],
                       num_frames=6)  # default span: the 4 frames the model is sampled at
    assert (windowed_run - plain).abs().max() > 1e-3
    assert not hasattr(pipe.transformer, "_temporal_map_controller")


def test_bad_window_settings_are_errors():
    with pytest.raises(ValueError, match="reference"):
        get_guidance("temporal-self-guidance", reference="earlier")
    with pytest.raises(ValueError, match="span"):
        get_guidance("temporal-self-guidance", reference="window", span=0)


@pytest.mark.parametrize("guider_class, name, options", [
    (TemporalSelfGuider, "temporal-self-guidance", {"strength": 0.8, "steps": 1.0}),
    (TemporalSelfGuider, "temporal-self-guidance", {"strength": 1.0, "steps": 1.0, "reference": "window"}),
    (FourierMotionGuider, "fourier-motion", {"strength": 1.0, "steps": 1.0}),
])
def test_guider_equals_the_guidance_object(guider_class, name, options):
    pipe = tiny_pipe()
    expected = run(pipe, [get_guidance(name, **options)], num_frames=6)
    plain = run(pipe, num_frames=6)
    pipe.guider = guider_class(guidance_scale=5.0, **options)
    got = run(pipe, num_frames=6)
    assert torch.equal(got, expected) and (got - plain).abs().max() > 1e-3
    assert all(type(m.processor).__name__ != "_GuidedProcessor" for m in (b.attn1 for b in pipe.transformer.blocks))
    pipe.guider = guider_class(guidance_scale=5.0, **dict(options, strength=0.0))
    assert torch.equal(run(pipe, num_frames=6), plain)  # strength 0: plain classifier-free guidance, bitwise
    reloaded = guider_class.from_config(guider_class(guidance_scale=3.0, **options).config)
    assert reloaded.map_guidance.strength == options["strength"] and reloaded.guidance_scale == 3.0


def test_longer_tables_keep_the_trained_frames(pipe):
    transformer = pipe.transformer
    longer = with_max_frames(transformer, 12)
    assert longer.config.max_frames == 12 and with_max_frames(transformer, 8) is transformer
    latents = torch.randn(1, 3, 4, 16, 16)
    text = torch.randn(1, 5, 32)
    with torch.no_grad():
        before = transformer(latents, torch.tensor([500.0]), text, return_dict=False)[0]
        after = longer(latents, torch.tensor([500.0]), text, return_dict=False)[0]
        assert torch.allclose(before, after, atol=1e-6)
        longer(torch.randn(1, 3, 12, 16, 16), torch.tensor([500.0]), text)  # 12 frames now taken
    with pytest.raises(ValueError):
        transformer.check_video_shape(12, 16, 16)


def test_turning_back_in_open_space_is_read():
    specs = sample_long_specs(12, torch.Generator().manual_seed(3), split="train", two_object_prob=0.0)
    specs = [s for s in specs if s.objects[0].motions[0] in ("left", "right", "up", "down")
             and len(s.objects[0].motions) == 1][:4]
    assert specs
    clips = render_long(specs, 32, generator=torch.Generator().manual_seed(0))
    turned = 0
    for clip, spec in zip(clips, specs):
        clip = (np.moveaxis(np.asarray(clip), 0, -1) + 1) / 2  # (3, T, H, W) in [-1, 1] -> (T, H, W, 3)
        assert score_long_clip(clip, spec)["kept_direction"] is True  # bounces at the edge are not turns
        there_and_back = np.concatenate([clip[:16], clip[:16][::-1]])
        if not score_long_clip(there_and_back, spec)["windows"][0]["motion"]:
            continue  # the first half did not move far enough to read
        assert score_long_clip(there_and_back, spec)["kept_direction"] is False
        still = np.repeat(clip[:1], 32, axis=0)
        assert score_long_clip(still, spec)["kept_direction"] is False
        turned += 1
    assert turned  # at least one clip was read both ways


def test_guidance_refuses_block_models():
    from test_block_diffusion import tiny_block_pipeline

    pipe = tiny_block_pipeline()
    with pytest.raises(ValueError, match="block-causal"):
        pipe("a red circle moves right", num_frames=8, num_inference_steps=1,
             guidance=[get_guidance("temporal-self-guidance", steps=1.0)])


def test_regime_script_runs(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "scripts" / "guidance_regimes.py"
    spec = importlib.util.spec_from_file_location("guidance_regimes_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "regimes.json"
    script.main(["length", "--frames", "34", "--prompts", "1", "--seeds", "1", "--steps", "1", "--device", "cpu",
                 "--setting", "none", "--setting", "win=temporal-self-guidance:reference=window:strength=1",
                 "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["frames"] == 34 and set(record["results"]) == {"none", "win"}
    assert {"kept", "motion", "windows", "flicker", "boundary_ratio", "overhead"} <= set(record["results"]["win"])
    assert "win" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown guidance"):
        script.main(["length", "--setting", "x=no-such-guidance"])


def test_interpolated_tables_pass_through_the_trained_rows():
    from t2v.guidance.position_interpolation import interpolated_rope, interpolated_rows

    table = torch.randn(8, 3, 5)
    rows = interpolated_rows(table, 4, 7)  # positions 0, 0.5, 1, ..., 3
    assert torch.equal(rows[::2], table[:4]) and torch.allclose(rows[1], (table[0] + table[1]) / 2)
    pipe = tiny_pipe()
    rope = pipe.transformer.rope
    cos, sin = rope.freqs_cos[:, :rope.t_dim], rope.freqs_sin[:, :rope.t_dim]
    same_cos, same_sin = interpolated_rope(cos, sin, 6, 6)
    assert torch.allclose(same_cos, cos[:6], atol=1e-6) and torch.allclose(same_sin, sin[:6], atol=1e-6)


def test_position_interpolation_acts_only_past_the_trained_length_and_restores_the_model():
    pipe = tiny_pipe()
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    rope = (pipe.transformer.rope.freqs_cos.clone(), pipe.transformer.rope.freqs_sin.clone())
    interpolate = get_guidance("position-interpolation")
    assert torch.equal(run(pipe, [interpolate], num_frames=4), run(pipe, num_frames=4))  # the trained length
    longer = run(pipe, [interpolate], num_frames=8)
    assert (longer - run(pipe, num_frames=8, interpolate_positions=False)).abs().max() > 1e-3
    assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())
    assert torch.equal(pipe.transformer.rope.freqs_cos, rope[0]) and torch.equal(pipe.transformer.rope.freqs_sin, rope[1])
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    without_rope = run(pipe, [get_guidance("position-interpolation", rope=False)], num_frames=8)
    assert (without_rope - longer).abs().max() > 1e-4
    with pytest.raises(ValueError, match="trained_frames"):
        get_guidance("position-interpolation", trained_frames=1)


def test_position_interpolation_refuses_block_models():
    from test_block_diffusion import tiny_block_pipeline

    with pytest.raises(ValueError, match="chunk-by-chunk"):
        tiny_block_pipeline()("a red circle moves right", num_frames=8, num_inference_steps=1,
                              guidance=["position-interpolation"])


def test_longer_clips_get_position_interpolation_by_default():
    pipe = tiny_pipe()
    interpolated = run(pipe, [get_guidance("position-interpolation")], num_frames=8)
    assert torch.equal(run(pipe, num_frames=8), interpolated)  # added by default past the trained 4 frames
    plain = run(pipe, num_frames=8, interpolate_positions=False)
    assert (plain - interpolated).abs().max() > 1e-3
    assert torch.equal(run(pipe, num_frames=4, interpolate_positions=False), run(pipe, num_frames=4))
    assert torch.equal(run(pipe, [get_guidance("temporal-self-guidance")], num_frames=8),
                       run(pipe, [get_guidance("temporal-self-guidance"), get_guidance("position-interpolation")],
                           num_frames=8))
