"""What a clip of the video world contains, and how it is put into words.

A clip is described by a ``ClipSpec``: one or two ``ObjectSpec`` (colour,
shape, motion, speed) on a plain background. ``caption`` writes a random
paraphrase of a spec, ``canonical_caption`` one fixed, complete form, and
``parse_caption`` reads either back. All three share the phrase tables below,
so the parser and ``vocabulary`` can never drift from what captions say.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
BACKGROUNDS = ("black", "white", "gray")
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "still", "grow", "shrink")
LINEAR_MOTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")


@dataclass(frozen=True)
class ObjectSpec:
    """One object. ``speed`` is None for ``still`` objects (and, in a parsed
    caption, any field is None when the text does not say it)."""

    colour: str | None
    shape: str | None
    motion: str | None
    speed: str | None = None


@dataclass(frozen=True)
class ClipSpec:
    objects: tuple[ObjectSpec, ...]
    background: str


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption states; unstated fields are None."""

    objects: tuple[ObjectSpec, ...]
    background: str | None


SHAPE_WORDS = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
}
_LINEAR_VERBS = ("moves", "slides", "drifts", "glides", "travels")
_LINEAR_PARTICIPLES = ("moving", "sliding", "drifting", "gliding", "travelling")
_DIRECTION_WORDS = {
    "right": ("to the right", "rightward", "right"),
    "left": ("to the left", "leftward", "left"),
    "up": ("up", "upward"),
    "down": ("down", "downward"),
}
# Whole motion phrases for the motions that are not "verb + direction".
_FINITE_PHRASES = {
    "still": ("stays still", "sits still", "stays motionless"),
    "grow": ("grows", "gets bigger", "expands"),
    "shrink": ("shrinks", "gets smaller"),
}
_PARTICIPLE_PHRASES = {
    "still": ("resting motionless", "sitting still", "staying still"),
    "grow": ("growing", "getting bigger", "expanding"),
    "shrink": ("shrinking", "getting smaller"),
}
SPEED_WORDS = {"slow": ("slowly",), "fast": ("quickly", "fast")}
_BACKGROUND_PHRASES = ("on {}", "on a {} background", "against a {} backdrop")
_ARTICLES = ("a", "the", "")
_FILLERS = ("small",)

_CANONICAL_MOTION = {
    "right": "moves to the right",
    "left": "moves to the left",
    "up": "moves up",
    "down": "moves down",
    "still": "stays still",
    "grow": "grows",
    "shrink": "shrinks",
}
_CANONICAL_SPEED = {"slow": "slowly", "fast": "quickly"}

# Reading words back. Some accepted words (base verb forms, "grey") never
# appear in generated captions but are natural in typed prompts.
_WORD_MEANINGS: dict[str, tuple[str, str]] = {}
for _colour in COLOURS:
    _WORD_MEANINGS[_colour] = ("colour", _colour)
for _shape, _words in SHAPE_WORDS.items():
    for _word in _words:
        _WORD_MEANINGS[_word] = ("shape", _shape)
for _word, _motion in {
    "right": "right", "rightward": "right", "rightwards": "right",
    "left": "left", "leftward": "left", "leftwards": "left",
    "up": "up", "upward": "up", "upwards": "up",
    "down": "down", "downward": "down", "downwards": "down",
    "still": "still", "motionless": "still",
    "grows": "grow", "growing": "grow", "grow": "grow", "bigger": "grow",
    "expands": "grow", "expanding": "grow", "expand": "grow",
    "shrinks": "shrink", "shrinking": "shrink", "shrink": "shrink", "smaller": "shrink",
}.items():
    _WORD_MEANINGS[_word] = ("motion", _motion)
for _word, _speed in {"slowly": "slow", "slow": "slow",
                      "quickly": "fast", "fast": "fast", "quick": "fast"}.items():
    _WORD_MEANINGS[_word] = ("speed", _speed)
for _word, _background in {"black": "black", "white": "white", "gray": "gray", "grey": "gray"}.items():
    _WORD_MEANINGS[_word] = ("background", _background)


def tokenize_words(text: str) -> list[str]:
    """The one tokenizer rule: lower case, split on anything that is not a letter."""
    return re.findall(r"[a-z]+", text.lower())


def as_python_rng(generator_or_rng=None) -> random.Random:
    """A ``random.Random`` from a torch generator, a ``random.Random``, an int seed or None.

    A torch generator is advanced by one draw, so captions and pixels of a
    batch both follow from the caller's single generator.
    """
    if isinstance(generator_or_rng, random.Random):
        return generator_or_rng
    if isinstance(generator_or_rng, torch.Generator):
        seed = torch.randint(0, 2**62, (1,), generator=generator_or_rng, device=generator_or_rng.device)
        return random.Random(int(seed))
    return random.Random(generator_or_rng)


def _fix_article(words: list[str]) -> list[str]:
    """'a orange' -> 'an orange'."""
    rest = [w for w in words[1:] if w]
    if words[0] == "a" and rest and rest[0][0] in "aeiou":
        return ["an", *words[1:]]
    return words


def _motion_phrase(obj: ObjectSpec, finite: bool, rng: random.Random) -> str:
    if obj.motion in LINEAR_MOTIONS:
        verb = rng.choice(_LINEAR_VERBS if finite else _LINEAR_PARTICIPLES)
        return f"{verb} {rng.choice(_DIRECTION_WORDS[obj.motion])}"
    table = _FINITE_PHRASES if finite else _PARTICIPLE_PHRASES
    return rng.choice(table[obj.motion])


def _object_phrase(obj: ObjectSpec, rng: random.Random) -> str:
    finite = rng.random() < 0.6
    words = [rng.choice(_ARTICLES)]
    if rng.random() < 0.15:
        words.append(rng.choice(_FILLERS))
    words += [obj.colour, rng.choice(SHAPE_WORDS[obj.shape])]
    words = _fix_article(words)
    motion = _motion_phrase(obj, finite, rng)
    # Speed is stated in about half the captions, so the model also learns the
    # prompts that leave it open.
    if obj.motion != "still" and obj.speed is not None and rng.random() < 0.5:
        speed = rng.choice(SPEED_WORDS[obj.speed])
        if finite and speed != "fast" and rng.random() < 0.3:
            motion = f"{speed} {motion}"
        else:
            motion = f"{motion} {speed}"
    words.append(motion)
    return " ".join(w for w in words if w)


def caption(spec: ClipSpec, generator_or_rng=None) -> str:
    """A random paraphrase of ``spec`` (see the phrase tables above)."""
    rng = as_python_rng(generator_or_rng)
    text = " and ".join(_object_phrase(obj, rng) for obj in spec.objects)
    if rng.random() < 0.5:
        text += " " + rng.choice(_BACKGROUND_PHRASES).format(spec.background)
    return text


def canonical_caption(spec: ClipSpec) -> str:
    """One fixed form stating colour, shape, motion, speed (when it applies) and background."""
    phrases = []
    for obj in spec.objects:
        article = " ".join(_fix_article(["a", obj.colour]))
        phrase = f"{article} {obj.shape} {_CANONICAL_MOTION[obj.motion]}"
        if obj.motion != "still" and obj.speed is not None:
            phrase += f" {_CANONICAL_SPEED[obj.speed]}"
        phrases.append(phrase)
    return " and ".join(phrases) + f" on a {spec.background} background"


def parse_caption(text: str) -> CaptionSpec:
    """Read a caption back into what it states.

    Objects are separated by "and"; within each part the first word naming a
    colour, shape, motion or speed decides that field. The background may be
    named anywhere. A part that names nothing is dropped.
    """
    parts: list[list[str]] = [[]]
    for word in tokenize_words(text):
        if word == "and":
            parts.append([])
        else:
            parts[-1].append(word)
    background = None
    objects = []
    for words in parts:
        fields: dict[str, str] = {}
        for word in words:
            meaning = _WORD_MEANINGS.get(word)
            if meaning is None:
                continue
            field, value = meaning
            if field == "background":
                background = value
            else:
                fields.setdefault(field, value)
        if fields:
            objects.append(ObjectSpec(fields.get("colour"), fields.get("shape"),
                                      fields.get("motion"), fields.get("speed")))
    return CaptionSpec(objects=tuple(objects), background=background)


def vocabulary() -> list[str]:
    """Every word any generated or canonical caption can contain, sorted."""
    phrases = ["and", "an", *_ARTICLES, *_FILLERS, *COLOURS, *BACKGROUNDS,
               *_LINEAR_VERBS, *_LINEAR_PARTICIPLES, *_CANONICAL_MOTION.values(),
               *_CANONICAL_SPEED.values(), *_BACKGROUND_PHRASES, "background"]
    for table in (SHAPE_WORDS, _DIRECTION_WORDS, _FINITE_PHRASES, _PARTICIPLE_PHRASES, SPEED_WORDS):
        for options in table.values():
            phrases += options
    words = set()
    for phrase in phrases:
        words.update(tokenize_words(phrase))
    return sorted(words)
