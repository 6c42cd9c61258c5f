import random

import pytest
import torch

from t2v.data import (BACKGROUND_RGB, COLOURS, MOTIONS, OBJECT_RGB, SHAPES, ClipSpec, ObjectSpec,
                      VideoWorld, canonical_caption, caption, is_held_out, parse_caption, render,
                      sample_layout, sample_specs, tokenize_words, vocabulary)
from t2v.eval import prompt_suite


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def test_sample_shapes_range_and_captions():
    videos, captions, specs = VideoWorld().sample(12, _generator(0))
    assert videos.shape == (12, 3, 16, 32, 32)
    assert videos.dtype == torch.float32
    assert videos.min() >= -1 and videos.max() <= 1
    assert len(captions) == len(specs) == 12
    assert all(isinstance(c, str) and c for c in captions)


def test_same_seed_same_clips_other_seed_different():
    world = VideoWorld(two_object_prob=0.5)
    first = world.sample(8, _generator(3))
    again = world.sample(8, _generator(3))
    other = world.sample(8, _generator(4))
    assert torch.equal(first[0], again[0])
    assert first[1] == again[1] and first[2] == again[2]
    assert not torch.equal(first[0], other[0])
    assert first[1] != other[1]


def test_render_other_sizes_keeps_objects_inside_and_apart():
    specs = sample_specs(300, _generator(1), two_object_prob=1.0)
    for frames, height, width in [(16, 32, 32), (24, 48, 64), (8, 16, 16)]:
        layout = sample_layout(specs, frames, height, width, _generator(2))
        x, y, r = layout.centre_x, layout.centre_y, layout.radius
        assert (x - r).min() >= 0 and (y - r).min() >= 0
        assert (x + r).max() <= width and (y + r).max() <= height
        reach = r[:, 0] + r[:, 1]
        apart = torch.maximum((x[:, 0] - x[:, 1]).abs() - reach, (y[:, 0] - y[:, 1]).abs() - reach)
        assert (apart.amin(-1) > 0).float().mean() > 0.99
        videos = render(specs[:4], frames, height, width, generator=_generator(2))
        assert videos.shape == (4, 3, frames, height, width)


def test_rendered_pixels_match_named_colours():
    spec = ClipSpec((ObjectSpec("orange", "square", "right", "slow"),), "white")
    video = render([spec], generator=_generator(0))[0]
    rgb = ((video + 1) * 127.5).round().permute(1, 2, 3, 0).reshape(-1, 3)
    colours = {tuple(int(c) for c in pixel) for pixel in rgb}
    assert tuple(BACKGROUND_RGB["white"]) in colours and tuple(OBJECT_RGB["orange"]) in colours
    # Border pixels are pure background on every frame.
    border = torch.cat([video[:, :, 0], video[:, :, -1], video[:, :, :, 0], video[:, :, :, -1]], -1)
    assert torch.allclose(border, torch.ones_like(border))


def test_motion_moves_the_object_the_right_way():
    spec = ClipSpec((ObjectSpec("red", "circle", "right", "fast"),), "black")
    video = render([spec], generator=_generator(0))[0]
    red = video[0] > 0  # (T, H, W), only the red object has a high red channel on black
    xs = torch.arange(32.0)
    centre = [(red[t].float().sum(0) * xs).sum() / red[t].sum() for t in (0, 15)]
    assert centre[1] - centre[0] > 12  # fast is about 16 px at 32 px wide


def test_train_split_has_no_held_out_pairs_and_heldout_has_one_everywhere():
    train = sample_specs(3000, _generator(0), "train", two_object_prob=0.5)
    heldout = sample_specs(500, _generator(0), "heldout", two_object_prob=0.5)
    assert not any(is_held_out(s) for s in train)
    assert all(is_held_out(s) for s in heldout)
    assert is_held_out(ClipSpec((ObjectSpec("red", "triangle", "up", "slow"),), "gray"))
    assert is_held_out(ClipSpec((ObjectSpec("blue", "circle", "still"),
                                 ObjectSpec("purple", "square", "down", "fast")), "gray"))
    assert not is_held_out(ClipSpec((ObjectSpec("purple", "triangle", "up", "slow"),), "gray"))
    # Every colour, shape and motion is still seen in training.
    seen = {(o.colour, o.shape, o.motion) for s in train for o in s.objects}
    assert {c for c, _, _ in seen} == set(COLOURS)
    assert {s for _, s, _ in seen} == set(SHAPES)
    assert {m for _, _, m in seen} == set(MOTIONS)
    for s in train:
        assert len({o.colour for o in s.objects}) == len(s.objects)


def test_world_samples_follow_the_split():
    _, _, specs = VideoWorld(split="heldout").sample(32, _generator(5))
    assert all(is_held_out(s) for s in specs)
    with pytest.raises(ValueError):
        VideoWorld(split="validation")


def test_caption_round_trip_over_many_paraphrases():
    rng = random.Random(0)
    specs = sample_specs(400, _generator(7), "train", 0.4) + sample_specs(200, _generator(8), "heldout", 0.4)
    for spec in specs:
        for _ in range(5):
            text = caption(spec, rng)
            parsed = parse_caption(text)
            assert len(parsed.objects) == len(spec.objects), text
            assert parsed.background in (None, spec.background), text
            for said, true in zip(parsed.objects, spec.objects):
                assert (said.colour, said.shape, said.motion) == (true.colour, true.shape, true.motion), text
                assert said.speed in (None, true.speed), text


def test_captions_vary_and_sometimes_state_speed_and_background():
    rng = random.Random(1)
    spec = ClipSpec((ObjectSpec("red", "circle", "right", "fast"),), "black")
    texts = {caption(spec, rng) for _ in range(300)}
    parsed = [parse_caption(t) for t in texts]
    assert len(texts) > 50
    assert 0.2 < sum(p.objects[0].speed == "fast" for p in parsed) / len(parsed) < 0.8
    assert 0.2 < sum(p.background == "black" for p in parsed) / len(parsed) < 0.8


def test_canonical_caption_states_everything():
    spec = ClipSpec((ObjectSpec("orange", "triangle", "shrink", "slow"),
                     ObjectSpec("cyan", "square", "still")), "gray")
    text = canonical_caption(spec)
    assert text == ("an orange triangle shrinks slowly and a cyan square stays still "
                    "on a gray background")
    parsed = parse_caption(text)
    assert parsed.objects == spec.objects and parsed.background == "gray"
    for spec in sample_specs(300, _generator(2), two_object_prob=0.5):
        parsed = parse_caption(canonical_caption(spec))
        assert parsed.objects == spec.objects and parsed.background == spec.background


def test_vocabulary_covers_every_caption_word():
    words = set(vocabulary())
    assert vocabulary() == sorted(words) and all(w == w.lower() for w in words)
    rng = random.Random(2)
    for spec in sample_specs(500, _generator(3), two_object_prob=0.5):
        for text in (caption(spec, rng), canonical_caption(spec)):
            assert set(tokenize_words(text)) <= words, text


def test_tokenize_words():
    assert tokenize_words("A red-ball, moving  RIGHT!") == ["a", "red", "ball", "moving", "right"]


def test_prompt_suite_is_fixed_and_split_aware():
    heldout = prompt_suite("heldout", 40, seed=0)
    assert heldout == prompt_suite("heldout", 40, seed=0)
    assert heldout != prompt_suite("heldout", 40, seed=1)
    assert all(is_held_out(spec) for _, spec in heldout)
    train = prompt_suite("train", 40, seed=0)
    assert not any(is_held_out(spec) for _, spec in train)
    assert all(text == canonical_caption(spec) for text, spec in train)
    counts = [len(spec.objects) for _, spec in prompt_suite("train", 200, seed=0)]
    assert 0.05 < counts.count(2) / len(counts) < 0.4
