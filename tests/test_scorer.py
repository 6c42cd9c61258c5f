import dataclasses

import numpy as np
import pytest
import torch

from t2v.data import ClipSpec, ObjectSpec, render, sample_specs
from t2v.eval import clip_frames, confusion, read_clip, score_clip, score_suite


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _render_one(spec, seed=0):
    return render([spec], generator=_generator(seed))[0]


def test_ground_truth_scores_near_perfect():
    specs = sample_specs(24, _generator(0), "train", 0.3) + sample_specs(24, _generator(1), "heldout", 0.3)
    videos = render(specs, generator=_generator(2))
    summary = score_suite(videos, specs)
    assert summary["n_clips"] == 48
    for attribute in ("colour", "shape", "motion", "speed", "background", "count", "all"):
        assert summary[attribute] >= 0.98, (attribute, summary[attribute])
    assert summary["flicker"] < 0.01


def test_confusion_counts_what_was_read_for_each_prompted_motion_and_shape():
    right = ClipSpec((ObjectSpec("red", "square", "right", "fast"),), "black")
    grow = ClipSpec((ObjectSpec("blue", "circle", "grow", "fast"),), "white")
    videos = render([right, right, grow], generator=_generator(3))
    # Told "left" for a clip that goes right, and "green" for one with no green object.
    told = [right, dataclasses.replace(right, objects=(dataclasses.replace(right.objects[0], motion="left"),)),
            dataclasses.replace(grow, objects=(dataclasses.replace(grow.objects[0], colour="green"),))]
    assert confusion(videos, told, "motion") == {"right": {"right": 1}, "left": {"right": 1}, "grow": {"missing": 1}}
    # Readings made once serve both summaries, with the same results as reading the clips again.
    readings = [read_clip(video) for video in videos]
    assert confusion(videos, told, "motion", readings=readings) == confusion(videos, told, "motion")
    # Told "circle" for the square: shape is tabled the same way.
    told[0] = dataclasses.replace(right, objects=(dataclasses.replace(right.objects[0], shape="circle"),))
    assert confusion(videos, told, "shape", readings=readings) == {"circle": {"square": 1, "missing": 1},
                                                         "square": {"square": 1}}
    with pytest.raises(ValueError, match="speed"):
        confusion(videos, told, "speed", readings=readings)
    with_readings, without = score_suite(videos, told, readings), score_suite(videos, told)
    assert with_readings == without and with_readings["motion"] == 1 / 3


def test_reading_names_every_attribute():
    spec = ClipSpec((ObjectSpec("blue", "triangle", "down", "fast"),
                     ObjectSpec("yellow", "circle", "grow", "slow")), "white")
    reading = read_clip(_render_one(spec))
    assert reading.background == "white"
    assert sorted(o.colour for o in reading.objects) == ["blue", "yellow"]
    blue, yellow = reading.find("blue"), reading.find("yellow")
    assert (blue.shape, blue.motion, blue.speed) == ("triangle", "down", "fast")
    assert (yellow.shape, yellow.motion, yellow.speed) == ("circle", "grow", "slow")
    assert blue.track.shape == (16, 2) and blue.track[-1, 1] > blue.track[0, 1] + 8
    assert 1.6 < yellow.size_ratio < 2.0


def test_all_accepted_clip_forms_read_the_same():
    spec = ClipSpec((ObjectSpec("green", "square", "left", "slow"),), "gray")
    video = _render_one(spec)  # (3, T, H, W) in [-1, 1]
    unit = ((video + 1) / 2).permute(1, 2, 3, 0)  # (T, H, W, 3) in [0, 1]
    forms = [video, video.numpy(), unit, unit.numpy(), (unit * 255).round().to(torch.uint8),
             (unit.numpy() * 255).round().astype(np.uint8)]
    reference = clip_frames(video)
    assert reference.shape == (16, 32, 32, 3)
    for form in forms:
        assert np.abs(clip_frames(form) - reference).max() < 0.003
        assert score_clip(form, spec)["all"]


def test_wrong_colour_direction_shape_and_background_are_caught():
    spec = ClipSpec((ObjectSpec("red", "square", "right", "fast"),), "black")
    video = _render_one(spec)
    assert score_clip(video, spec)["all"]
    swaps = {
        "colour": dataclasses.replace(spec.objects[0], colour="blue"),
        "motion": dataclasses.replace(spec.objects[0], motion="left"),
        "shape": dataclasses.replace(spec.objects[0], shape="triangle"),
        "speed": dataclasses.replace(spec.objects[0], speed="slow"),
    }
    for attribute, wrong in swaps.items():
        result = score_clip(video, ClipSpec((wrong,), "black"))
        assert result[attribute] is False and result["all"] is False, attribute
    result = score_clip(video, ClipSpec(spec.objects, "white"))
    assert result["background"] is False and result["colour"] is True
    # A clip rendered from another spec is scored wrong on exactly what differs.
    other = _render_one(ClipSpec((ObjectSpec("red", "square", "up", "fast"),), "black"))
    result = score_clip(other, spec)
    assert result["motion"] is False and result["colour"] and result["shape"] and result["background"]


def test_missing_and_extra_objects_change_count():
    one = ClipSpec((ObjectSpec("cyan", "circle", "still"),), "black")
    two = ClipSpec((ObjectSpec("cyan", "circle", "still"), ObjectSpec("orange", "square", "up", "slow")), "black")
    assert score_clip(_render_one(one), two)["count"] is False
    assert score_clip(_render_one(one), two)["colour"] is False
    assert score_clip(_render_one(two), one)["count"] is False


def test_caption_targets_leave_unstated_attributes_open():
    spec = ClipSpec((ObjectSpec("purple", "circle", "up", "fast"),), "gray")
    video = _render_one(spec)
    result = score_clip(video, "a purple ball drifts upward")
    assert result["speed"] is None and result["background"] is None and result["all"]
    result = score_clip(video, "a purple ball drifts upward slowly on white")
    assert result["speed"] is False and result["background"] is False and result["motion"]
    summary = score_suite([video, video], ["a purple ball drifts upward", "a purple disc moves up quickly"])
    assert summary["speed"] == 1.0 and summary["background"] is None and summary["all"] == 1.0


def test_flicker_grows_with_temporal_noise():
    spec = ClipSpec((ObjectSpec("yellow", "triangle", "right", "slow"),), "black")
    video = _render_one(spec)
    noisy = (video + 0.1 * torch.randn(video.shape, generator=_generator(9))).clamp(-1, 1)
    steady, shaky = read_clip(video).flicker, read_clip(noisy).flicker
    assert steady < 0.01 and shaky > 5 * max(steady, 0.002)
