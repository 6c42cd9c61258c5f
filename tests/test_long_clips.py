import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from t2v.data import (BACKGROUND_RGB, CHAIN_MOTIONS, OBJECT_RGB, ClipSpec, LongVideoWorld, ObjectSpec,
                      canonical_caption, caption, is_held_out, long_layout, long_prompt_suite, parse_caption, render,
                      render_long, sample_layout, sample_long_specs, segment_bounds, split_chained_prompt,
                      tokenize_words, vocabulary)
from t2v.data.captions import as_python_rng
from t2v.data.render import TRAVEL
from t2v.eval import evaluate_long_suite, read_clip, score_clip, score_long_clip, score_long_suite

ROOT = Path(__file__).resolve().parents[1]


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _one(colour, shape, motion, speed=None, then=(), background="black"):
    return ClipSpec((ObjectSpec(colour, shape, motion, speed, tuple(then)),), background)


def test_short_captions_are_unchanged_for_specs_without_a_chain():
    specs = [_one("orange", "circle", "right", "fast"),
             ClipSpec((ObjectSpec("yellow", "triangle", "still"), ObjectSpec("blue", "square", "shrink", "slow")),
                      "gray"),
             _one("cyan", "square", "up", "slow", background="white")]
    # Written by the captions of the 16-frame world before chains existed.
    expected = [
        ("an orange circle moves to the right quickly on a black background",
         ["orange ball glides right against a black backdrop", "orange circle glides rightward quickly on a black "
          "background", "orange disc moving right quickly on black"]),
        ("a yellow triangle stays still and a blue square shrinks slowly on a gray background",
         ["the yellow triangle stays motionless and the blue block shrinks slowly", "a yellow triangle resting "
          "motionless and a small blue box shrinks on gray", "a yellow triangle sitting still and blue square "
          "shrinks on gray"]),
        ("a cyan square moves up slowly on a white background",
         ["a cyan square slides up on a white background", "a cyan square gliding up",
          "the small cyan square moves upward"]),
    ]
    rng = random.Random(11)
    for spec, (canonical, paraphrases) in zip(specs, expected):
        assert canonical_caption(spec) == canonical
        assert [caption(spec, rng) for _ in range(3)] == paraphrases


def test_chained_captions_read_back():
    spec = _one("red", "circle", "right", "fast", ["up"])
    assert canonical_caption(spec) == "a red circle moves to the right quickly, then moves up on a black background"
    still_first = _one("blue", "square", "still", "slow", ["left", "down"], "white")
    assert canonical_caption(still_first) == ("a blue square stays still, then moves to the left slowly, "
                                              "then moves down on a white background")
    assert parse_caption("the small blue ball slides left and then stays still").objects == (
        ObjectSpec("blue", "circle", "left", None, ("still",)),)
    rng = random.Random(0)
    words = set(vocabulary())
    assert "then" in words
    chained = [s for s in sample_long_specs(300, _generator(1), "train", 0.0, chain_prob=1.0)]
    assert all(2 <= len(s.objects[0].motions) <= 3 for s in chained)
    for spec in chained:
        parsed = parse_caption(canonical_caption(spec))
        assert parsed.objects == spec.objects and parsed.background == spec.background
        for _ in range(3):
            text = caption(spec, rng)
            said, true = parse_caption(text).objects, spec.objects[0]
            assert len(said) == 1, text
            assert (said[0].colour, said[0].shape, said[0].motions) == (true.colour, true.shape, true.motions), text
            assert said[0].speed in (None, true.speed), text
            assert set(tokenize_words(text)) <= words, text


def test_split_chained_prompt():
    assert split_chained_prompt("a red circle moves to the right, then up on black") == [
        "a red circle moves to the right on a black background", "a red circle moves up on a black background"]
    assert split_chained_prompt("the small blue ball slides left and then stays still") == [
        "the small blue ball slides left", "the small blue ball stays still"]
    assert split_chained_prompt("A Green box on grey drifts up, then to the left, then grows") == [
        "A Green box drifts up on a gray background", "A Green box moves to the left on a gray background",
        "A Green box grows on a gray background"]
    assert split_chained_prompt("red moves down then leftward") == ["red moves down", "red moves leftward"]
    plain = "a purple triangle moves right and a cyan disc stays still on white"
    assert split_chained_prompt(plain) == [plain]
    with pytest.raises(ValueError, match="one object"):
        split_chained_prompt("a red circle moves right and a blue square moves up, then down")
    # Every segment reads back as the one motion it holds.
    spec = _one("yellow", "triangle", "still", "fast", ["right", "up"], "gray")
    segments = split_chained_prompt(canonical_caption(spec))
    assert [parse_caption(s).objects[0].motion for s in segments] == ["still", "right", "up"]
    assert all(parse_caption(s).background == "gray" and "then" not in s for s in segments)


def test_segment_bounds():
    assert segment_bounds(64, 3) == [(0, 20), (20, 40), (40, 64)]
    assert segment_bounds(64, 1) == [(0, 64)]
    assert segment_bounds(8, 2) == [(0, 4), (4, 8)]
    assert segment_bounds(24, 2, chunk_frames=3) == [(0, 12), (12, 24)]
    for frames, segments in [(62, 2), (0, 1), (8, 3), (8, 0)]:
        with pytest.raises(ValueError):
            segment_bounds(frames, segments)


def test_long_specs_follow_the_split_and_chain_rules():
    train = sample_long_specs(1500, _generator(0), "train", 0.2, chain_prob=0.5)
    heldout = sample_long_specs(500, _generator(1), "heldout", 0.2, chain_prob=0.5)
    assert not any(is_held_out(s) for s in train) and all(is_held_out(s) for s in heldout)
    for spec in train + heldout:
        obj = spec.objects[0]
        if obj.then:
            assert len(spec.objects) == 1 and obj.speed is not None
            assert set(obj.motions) <= set(CHAIN_MOTIONS)
            assert all(a != b for a, b in zip(obj.motions, obj.motions[1:]))
    share = np.mean([bool(s.objects[0].then) for s in train if len(s.objects) == 1])
    assert 0.4 < share < 0.6
    # A held-out colour-motion pair may sit anywhere in a chain.
    assert is_held_out(_one("yellow", "circle", "up", "slow", ["left"]))


def test_long_clips_stay_inside_the_frame_and_bounce():
    specs = sample_long_specs(60, _generator(2), "train", 0.5, chain_prob=0.5)
    layout = long_layout(specs, 96, 32, 32, _generator(3))
    x, y, r = layout.centre_x, layout.centre_y, layout.radius
    present = layout.present[..., None]
    assert ((x - r)[present.expand_as(x)] >= 0.999).all() and ((x + r)[present.expand_as(x)] <= 31.001).all()
    assert ((y - r)[present.expand_as(y)] >= 0.999).all() and ((y + r)[present.expand_as(y)] <= 31.001).all()
    video = render_long(specs[:8], 96, generator=_generator(3))
    border = torch.cat([video[:, :, :, 0], video[:, :, :, -1], video[:, :, :, :, 0], video[:, :, :, :, -1]], -1)
    assert torch.equal(border, border[..., :1].expand_as(border))  # pure background on every frame

    fast_right = _one("red", "square", "right", "fast")
    track = read_clip(render_long([fast_right], 64, generator=_generator(4))[0]).find("red")
    steps = np.diff(track.track[:, 0])
    assert steps[0] > 0.9  # first heads right, about 1.1 px a frame
    turn = int(np.argmax(steps < 0))
    assert turn > 0 and steps[turn:turn + 5].max() < 0  # then comes back
    assert 30.5 < np.nanmax(track.extent[turn - 1:turn + 2, 1]) <= 31.1  # after touching the edge


@pytest.mark.parametrize("speed", ["slow", "fast"])
def test_long_clips_move_at_the_16_frame_speed(speed):
    specs = [_one("green", "square", "right", speed), _one("blue", "circle", "down", speed)] * 4
    short, long = sample_layout(specs, 16, 32, 32, _generator(5)), long_layout(specs, 64, 32, 32, _generator(5))
    short_steps = (short.centre_x + short.centre_y).diff(dim=-1)[:, 0]
    long_steps = (long.centre_x + long.centre_y).diff(dim=-1)[:, 0].abs()
    # Same draws, same per-frame speed: every step but a bounce's moves exactly as far.
    assert torch.allclose(long_steps.median(-1).values, short_steps[:, 0], atol=1e-4)
    # And as read from the pixels, within the world's speed jitter.
    short_clip = render(specs[:1], generator=_generator(6))[0]
    track = read_clip(short_clip).find("green").track[:, 0]
    long_track = read_clip(render_long(specs[:1], 64, generator=_generator(6))[0]).find("green").track[:, 0]
    per_step = abs(track[15] - track[0]) / 15
    assert abs(np.median(np.abs(np.diff(long_track))) - per_step) < 0.1
    assert abs(per_step / (TRAVEL[speed] * 32 / 15) - 1) <= 0.12


def test_render_long_is_deterministic_and_windows_match_the_whole_clip():
    specs = sample_long_specs(6, _generator(7), "heldout", 0.5, chain_prob=0.5)
    whole = render_long(specs, 64, generator=_generator(8))
    assert whole.shape == (6, 3, 64, 32, 32) and whole.min() >= -1 and whole.max() <= 1
    assert torch.equal(whole, render_long(specs, 64, generator=_generator(8)))
    assert not torch.equal(whole, render_long(specs, 64, generator=_generator(9)))
    part = render_long(specs, 64, generator=_generator(8), start_frame=20, num_frames=16)
    assert torch.equal(part, whole[:, :, 20:36])
    starts = [0, 4, 48, 12, 36, 20]
    per_clip = render_long(specs, 64, generator=_generator(8), start_frame=starts, num_frames=16)
    for clip, start in enumerate(starts):
        assert torch.equal(per_clip[clip], whole[clip, :, start:start + 16])
    with pytest.raises(ValueError):
        render_long(specs, 64, start_frame=56, num_frames=16)


def test_crossing_objects_cover_each_other_instead_of_mixing():
    colours = {"red": OBJECT_RGB["red"], "blue": OBJECT_RGB["blue"]}
    spec = ClipSpec((ObjectSpec("red", "square", "right", "fast"), ObjectSpec("blue", "square", "down", "fast")),
                    "gray")
    specs = [spec] * 8
    # Over 256 frames a right-moving and a down-moving path seldom find a timing that misses.
    layout = long_layout(specs, 256, 32, 32, _generator(10))
    reach = layout.radius[:, 0] + layout.radius[:, 1]
    overlap = torch.maximum((layout.centre_x[:, 0] - layout.centre_x[:, 1]).abs(),
                            (layout.centre_y[:, 0] - layout.centre_y[:, 1]).abs()) < reach - 2
    clip, frame = [int(i) for i in overlap.nonzero()[0]]
    video = render_long(specs, 256, generator=_generator(10), start_frame=frame, num_frames=1)[clip, :, 0]
    # The later (blue) object is drawn whole over the red one ...
    cx, cy = int(layout.centre_x[clip, 1, frame]), int(layout.centre_y[clip, 1, frame])
    blue = torch.tensor(colours["blue"]) / 127.5 - 1
    assert torch.allclose(video[:, cy, cx], blue)
    # ... and every pixel is a blend of background, red and blue with weights summing to one (not added up).
    palette = torch.tensor([BACKGROUND_RGB["gray"], colours["red"], colours["blue"]], dtype=torch.float64).T / 255
    weights = torch.linalg.solve(palette, ((video.double() + 1) / 2).reshape(3, -1))
    assert (weights.sum(0) - 1).abs().max() < 0.02 and weights.min() > -0.02


def test_sample_windows_caption_each_chunk_with_its_segment():
    world = LongVideoWorld(frames=64, chain_prob=0.6)
    videos, chunk_captions, offsets = world.sample_windows(48, _generator(11), window_frames=16)
    assert videos.shape == (48, 3, 16, 32, 32)
    assert len(chunk_captions) == 48 and all(len(c) == 4 for c in chunk_captions)
    assert all(o % 4 == 0 and 0 <= o <= 48 for o in offsets)
    assert 0.15 < offsets.count(0) / 48 < 0.6 and any(o >= 4 for o in offsets)
    # The same generator draws the same specs, then the same pixels.
    generator = _generator(11)
    specs = sample_long_specs(48, as_python_rng(generator), "train", 0.2, 0.6)
    whole = render_long(specs, 64, generator=generator)
    chained = 0
    for spec, captions, offset, window, clip in zip(specs, chunk_captions, offsets, videos, whole):
        assert torch.equal(window, clip[:, offset:offset + 16])
        bounds = segment_bounds(64, len(spec.objects[0].motions))
        chained += len({*captions}) > 1
        for j, text in enumerate(captions):
            assert "then" not in tokenize_words(text)
            segment = next(s for s, (a, b) in enumerate(bounds) if a <= offset + 4 * j < b)
            said = parse_caption(text).objects
            assert [o.motion for o in said] == [o.motions[min(segment, len(o.motions) - 1)] for o in spec.objects]
            if j and next(s for s, (a, b) in enumerate(bounds) if a <= offset + 4 * j - 4 < b) == segment:
                assert text == captions[j - 1]  # one paraphrase per segment
    assert chained > 0
    videos, captions, specs = world.sample(4, _generator(12))
    assert videos.shape == (4, 3, 64, 32, 32) and len(captions) == len(specs) == 4


def test_ground_truth_long_clips_score_near_perfect():
    specs = [s for _, s in long_prompt_suite("heldout", 40)] + [s for _, s in long_prompt_suite("train", 40)]
    assert sum(bool(s.objects[0].then) for s in specs) >= 10
    videos = render_long(specs, 64, generator=_generator(13))
    summary = score_long_suite(videos, specs)
    assert summary["n_clips"] == 80
    assert summary["colour_and_motion"] >= 0.95 and summary["all"] >= 0.9, summary
    assert summary["chained"] >= 0.9
    assert 0.8 <= summary["boundary_ratio"] <= 1.25
    # A chained clip's windows follow its segments, and its caption judges as its spec does.
    clip = next(i for i, s in enumerate(specs) if len(s.objects[0].motions) == 3)
    result = score_long_clip(videos[clip], canonical_caption(specs[clip]))
    assert [w["frames"] for w in result["windows"]] == [(0, 20), (20, 40), (40, 56), (56, 64)]
    assert [w["expected_motion"] for w in result["windows"]] == [*specs[clip].objects[0].motions,
                                                                 specs[clip].objects[0].motions[-1]]
    assert result["all"] == summary["per_clip"][clip]["all"]


def test_bounce_at_the_edge_is_right_and_a_turn_in_open_space_is_wrong():
    # A fast object that starts well away from the edges and bounces about three times.
    spec = _one("orange", "circle", "right", "fast", background="white")
    seed = next(s for s in range(200) if _moves_right_in_open_space(spec, s, frames=10))
    video = render_long([spec], 64, generator=_generator(seed))[0]
    result = score_long_clip(video, spec)
    assert result["all"] and all(w["motion"] for w in result["windows"])
    # Read plainly, a window after the bounce goes left: only the unfolding makes it right.
    assert any(score_clip(video[:, a:b], spec)["motion"] is False for a, b in
               [w["frames"] for w in result["windows"]])
    left = score_long_clip(video, _one("orange", "circle", "left", "fast", background="white"))
    assert left["windows"][0]["motion"] is False and not left["all"]

    # A slow object that turns back in the middle of the frame: frames 0..23, then 23 back to 16.
    slow = _one("orange", "circle", "right", "slow", background="white")
    seed = next(s for s in range(200) if _moves_right_in_open_space(slow, s, frames=24))
    clip = render_long([slow], 64, generator=_generator(seed))[0, :, :24]
    turned = torch.cat([clip, clip.flip(1)[:, :8]], 1)
    result = score_long_clip(turned, slow)
    assert [w["motion"] for w in result["windows"]] == [True, False]
    assert result["colour_and_motion"] is False and result["every_window"]["colour"] is True
    # Going back the whole second window reads as the other way: right for a chain that asks for it.
    back = torch.cat([clip[:, :16], clip[:, :16].flip(1)], 1)
    assert [w["motion"] for w in score_long_clip(back, slow)["windows"]] == [True, False]
    chain = score_long_clip(back, "an orange circle moves right slowly, then moves left slowly")
    assert [w["motion"] for w in chain["windows"]] == [True, True] and chain["all"]
    swapped = score_long_clip(back, "an orange circle moves left, then right")
    assert [w["motion"] for w in swapped["windows"]] == [False, False]


def _moves_right_in_open_space(spec, seed, frames) -> bool:
    """True when the object moves right over its first ``frames`` frames, at least 4 px from either edge."""
    layout = long_layout([spec], 64, 32, 32, _generator(seed))
    x, r = layout.centre_x[0, 0, :frames], layout.radius[0, 0, :frames]
    return bool((x.diff() > 0).all() and (x + r).max() < 28 and (x - r).min() > 4)


def test_boundary_ratio_grows_with_jumps_between_chunks():
    spec = _one("purple", "square", "up", "slow", ["left"], "black")
    video = render_long([spec], 64, generator=_generator(15))[0]
    steady = score_long_clip(video, spec)
    # Each chunk gets its own fixed noise: frames jump only where a chunk starts.
    noise = 0.1 * torch.randn(3, 16, 1, 32, 32, generator=_generator(16)).repeat_interleave(4, 1).flatten(1, 2)
    jumpy = score_long_clip((video + noise).clamp(-1, 1), spec)
    assert 0.8 < steady["boundary_ratio"] < 1.25
    assert jumpy["boundary_ratio"] > 3 * steady["boundary_ratio"]
    assert jumpy["inner_jump"] == pytest.approx(steady["inner_jump"], rel=0.3)


class _WorldPipeline:
    """Stands in for a model: renders each prompt as the world does, seeded by its generator."""

    calls: list

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, num_frames, generator, output_type, **kwargs):
        self.calls.append((len(prompts), num_frames, kwargs))
        specs = [ClipSpec(parse_caption(p).objects, parse_caption(p).background) for p in prompts]
        clips = [render_long([s], num_frames, generator=torch.Generator().manual_seed(g.initial_seed()))[0]
                 for s, g in zip(specs, generator)]
        frames = np.stack([((c.permute(1, 2, 3, 0) + 1) / 2).numpy() for c in clips])
        return type("Output", (), {"frames": frames})()


def test_evaluate_long_suite_and_script(tmp_path):
    pipe = _WorldPipeline()
    result = evaluate_long_suite(pipe, "train", n_prompts=5, seeds=2, num_frames=32, batch_size=4,
                                 num_inference_steps=3)
    assert result["n_clips"] == 10 and result["split"] == "train" and result["colour_and_motion"] >= 0.9
    assert [c[:2] for c in pipe.calls] == [(4, 32), (4, 32), (2, 32)]
    assert pipe.calls[0][2] == {"num_inference_steps": 3}

    spec = importlib.util.spec_from_file_location("evaluate_long_script", ROOT / "scripts" / "evaluate_long.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "long.json"
    results = script.main(["--ground-truth", "--prompts", "6", "--seeds", "1", "--frames", "32", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [r["split"] for r in saved] == ["heldout", "train"] == [r["split"] for r in results]
    assert all(r["n_clips"] == 6 and r["colour_and_motion"] >= 0.8 for r in saved)
