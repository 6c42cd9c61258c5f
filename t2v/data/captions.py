"""What a clip of the video world contains, and how it is put into words.

A clip is described by a ``ClipSpec``: one or two ``ObjectSpec`` (colour,
shape, motion, speed) on a plain background. ``caption`` writes a random
paraphrase of a spec, ``canonical_caption`` one fixed, complete form, and
``parse_caption`` reads either back. All three share the phrase tables below,
so the parser and ``vocabulary`` can never drift from what captions say.

A long clip's object may chain motions ("moves right, then up"): its clip is
cut into segments (``segment_bounds``), one per motion, and a chunk-by-chunk
generator conditions each segment on its own caption (``split_chained_prompt``).
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
CHAIN_MOTIONS = (*LINEAR_MOTIONS, "still")  # what a chain may hold (sizes do not chain)
SPEEDS = ("slow", "fast")


@dataclass(frozen=True)
class ObjectSpec:
    """One object. ``speed`` is None for ``still`` objects (and, in a parsed
    caption, any field is None when the text does not say it). ``then``: the
    motions that follow ``motion`` in a long clip, in order; one speed serves all."""

    colour: str | None
    shape: str | None
    motion: str | None
    speed: str | None = None
    then: tuple[str, ...] = ()

    @property
    def motions(self) -> tuple:
        """Every motion of the object, in order."""
        return (self.motion, *self.then)


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
_CHAIN_LINKS = (", then ", " and then ")
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


def _motion_phrase(motion: str, finite: bool, rng: random.Random) -> str:
    if motion in LINEAR_MOTIONS:
        verb = rng.choice(_LINEAR_VERBS if finite else _LINEAR_PARTICIPLES)
        return f"{verb} {rng.choice(_DIRECTION_WORDS[motion])}"
    table = _FINITE_PHRASES if finite else _PARTICIPLE_PHRASES
    return rng.choice(table[motion])


def _first_moving(motions) -> int | None:
    """Index of the first motion that is not "still": where a chain states its speed."""
    return next((i for i, motion in enumerate(motions) if motion != "still"), None)


def _object_phrase(obj: ObjectSpec, rng: random.Random) -> str:
    finite = rng.random() < 0.6
    words = [rng.choice(_ARTICLES)]
    if rng.random() < 0.15:
        words.append(rng.choice(_FILLERS))
    words += [obj.colour, rng.choice(SHAPE_WORDS[obj.shape])]
    words = _fix_article(words)
    phrases = [_motion_phrase(motion, finite, rng) for motion in obj.motions]
    moving = _first_moving(obj.motions)
    # Speed is stated in about half the captions, so the model also learns the
    # prompts that leave it open.
    if moving is not None and obj.speed is not None and rng.random() < 0.5:
        speed = rng.choice(SPEED_WORDS[obj.speed])
        if finite and speed != "fast" and rng.random() < 0.3:
            phrases[moving] = f"{speed} {phrases[moving]}"
        else:
            phrases[moving] = f"{phrases[moving]} {speed}"
    motion = phrases[0]
    for phrase in phrases[1:]:
        motion += f"{rng.choice(_CHAIN_LINKS)}{phrase}"
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
        motions = [_CANONICAL_MOTION[motion] for motion in obj.motions]
        moving = _first_moving(obj.motions)
        if moving is not None and obj.speed is not None:
            motions[moving] += f" {_CANONICAL_SPEED[obj.speed]}"
        phrases.append(f"{article} {obj.shape} " + ", then ".join(motions))
    return " and ".join(phrases) + f" on a {spec.background} background"


def parse_caption(text: str) -> CaptionSpec:
    """Read a caption back into what it states.

    Objects are separated by "and" (but not "and then"); within each part the
    first word naming a colour, shape, motion or speed decides that field, and
    after each "then" the first motion word names the next motion of a chain.
    The background may be named anywhere. A part that names nothing is dropped.
    """
    words = tokenize_words(text)
    parts: list[list[str]] = [[]]
    for index, word in enumerate(words):
        if word != "and":
            parts[-1].append(word)
        elif words[index + 1:index + 2] != ["then"]:
            parts.append([])
    background = None
    objects = []
    for part in parts:
        fields: dict[str, str] = {}
        then: list[str | None] = []  # one entry per "then": the first motion word after it
        for word in part:
            if word == "then":
                then.append(None)
                continue
            meaning = _WORD_MEANINGS.get(word)
            if meaning is None:
                continue
            field, value = meaning
            if field == "background":
                background = value
            elif field == "motion" and then:
                then[-1] = then[-1] or value
            else:
                fields.setdefault(field, value)
        then = [motion for motion in then if motion is not None]
        if fields or then:
            objects.append(ObjectSpec(fields.get("colour"), fields.get("shape"), fields.get("motion"),
                                      fields.get("speed"), tuple(then)))
    return CaptionSpec(objects=tuple(objects), background=background)


_BACKGROUND_PATTERN = re.compile(
    r"\b(?:on|against|over)\s+(?:(?:a|an|the)\s+)?(black|white|gr[ae]y)(?:\s+(?:background|backdrop))?\b",
    re.IGNORECASE)
_DIRECTION_STARTS = {word for word, (field, value) in _WORD_MEANINGS.items()
                     if field == "motion" and value in LINEAR_MOTIONS}


def _tidy(text: str) -> str:
    """Spaces and runs of commas collapsed; punctuation or an "and" left at either end dropped."""
    text = re.sub(r"\s*,[\s,]*", ", ", re.sub(r"\s+", " ", text)).strip(" ,;.")
    return re.sub(r"^and\b|\band$", "", text, flags=re.IGNORECASE).strip(" ,;.")


def _subject(text: str) -> str:
    """The words of ``text`` up to its first shape word (else its colour word); empty if it has neither."""
    tokens = text.split()
    for field in ("shape", "colour"):
        for index, token in enumerate(tokens):
            if any(_WORD_MEANINGS.get(w, ("",))[0] == field for w in tokenize_words(token)):
                return " ".join(tokens[:index + 1]).rstrip(",;:.")
    return ""


def _starts_with_direction(text: str) -> bool:
    words = tokenize_words(text)
    if words[:1] and words[0] in _DIRECTION_STARTS:
        return True
    # "to the right", "towards the left"
    return words[:1] in (["to"], ["towards"], ["toward"]) and any(w in _DIRECTION_STARTS for w in words[1:3])


def split_chained_prompt(prompt: str) -> list[str]:
    """The caption of each segment of a chained prompt, for a generator that conditions segments apart.

    "a red circle moves to the right, then up on black" ->
    ["a red circle moves to the right on a black background", "a red circle moves up on a black background"].
    Later segments borrow the first one's subject; a background named anywhere is stated in every
    segment. A prompt without "then" comes back unchanged, as its only segment.
    """
    pieces = re.split(r"\bthen\b", prompt, flags=re.IGNORECASE)
    if len(pieces) == 1:
        return [prompt]
    if len(parse_caption(prompt).objects) > 1:
        raise ValueError("chained motions ('then') are supported for one object")
    background = None
    cleaned = []
    for piece in pieces:
        found = _BACKGROUND_PATTERN.search(piece)
        if found is not None:
            background = background or _WORD_MEANINGS[found.group(1).lower()][1]
            piece = _BACKGROUND_PATTERN.sub(" ", piece)
        cleaned.append(_tidy(piece))
    subject = _subject(cleaned[0])
    segments = [cleaned[0]] + [f"{subject} {'moves ' if _starts_with_direction(piece) else ''}{piece}".strip()
                               for piece in cleaned[1:] if piece]
    ending = f" on a {background} background" if background is not None else ""
    return [segment + ending for segment in segments if segment] or [prompt]


def segment_bounds(num_frames: int, num_segments: int, chunk_frames: int = 4) -> list[tuple[int, int]]:
    """(start, stop) frames of each segment of a chained clip, cut on chunk boundaries.

    Chunks are shared out as evenly as possible, later segments taking the
    remainder (16 chunks in 3 segments: 5, 5, 6); every segment gets at least one.
    """
    if chunk_frames < 1 or num_frames < 1 or num_frames % chunk_frames:
        raise ValueError(f"num_frames must be a positive multiple of {chunk_frames}, got {num_frames}")
    chunks = num_frames // chunk_frames
    if not 1 <= num_segments <= chunks:
        raise ValueError(f"{num_segments} segments do not fit in {chunks} chunks of {chunk_frames} frames")
    base, extra = divmod(chunks, num_segments)
    bounds, start = [], 0
    for index in range(num_segments):
        size = (base + (index >= num_segments - extra)) * chunk_frames
        bounds.append((start, start + size))
        start += size
    return bounds


def vocabulary() -> list[str]:
    """Every word any generated or canonical caption can contain, sorted."""
    phrases = ["and", "then", "an", *_ARTICLES, *_FILLERS, *COLOURS, *BACKGROUNDS,
               *_LINEAR_VERBS, *_LINEAR_PARTICIPLES, *_CANONICAL_MOTION.values(),
               *_CANONICAL_SPEED.values(), *_BACKGROUND_PHRASES, "background"]
    for table in (SHAPE_WORDS, _DIRECTION_WORDS, _FINITE_PHRASES, _PARTICIPLE_PHRASES, SPEED_WORDS):
        for options in table.values():
            phrases += options
    words = set()
    for phrase in phrases:
        words.update(tokenize_words(phrase))
    return sorted(words)
