"""The shapes world: procedural scenes of coloured shapes with exact ground truth (docs/shapes.md).

A `Scene` is resolution-free: centres and sizes are fractions of the image side, and `render` draws it
at any resolution. Captions, questions and texts are computed from the scene, so every answer is exact.
Randomness comes only from `random.Random` objects seeded by strings, so the same seed gives the same
scenes, and byte-identical files, in every process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from itertools import combinations, permutations
from pathlib import Path
from typing import Protocol, Sequence

from PIL import Image, ImageDraw

from janus.processing.chat import MATCH_QUESTION
from janus.processing.tokenizer import IMAGE_TOKEN

# Saturated colours at least 120 apart in RGB and from the background, chosen so that every blend of a
# colour with the background that is nearer the colour than the background is also nearer it than any
# other palette colour: an anti-aliased edge never looks like another colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (0, 180, 40),
    "blue": (30, 70, 240),
    "yellow": (250, 220, 0),
    "cyan": (0, 210, 230),
    "purple": (150, 40, 210),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUND = (127, 127, 127)  # the understanding preprocessing's padding grey
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Layout: boxes sit on a grid of 1/GRID of the image side, so at any multiple of GRID pixels (32, 64,
# 384) their edges fall on pixel boundaries and a shape renders exactly as the detector's template of
# it; a small object is then 8 px wide at 32 px, where all five shapes still render distinctly.
GRID = 32
SIZES = {"small": 8 / GRID, "large": 12 / GRID}  # side of the object's square bounding box, in image sides
SIZE_THRESHOLD = 10 / GRID  # a measured side below this is small
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_OBJECTS = 4

# In grid cells: BORDER keeps boxes off the edge; GAP keeps them apart so each stays its own connected
# component; RELATION_MARGIN keeps a pair's horizontal and vertical offsets apart so its relation is
# never a toss-up. REGION_MARGIN (image sides) keeps a centre off the thirds lines before "where" is asked.
BORDER = 1
GAP = 2
RELATION_MARGIN = 3 / GRID
REGION_MARGIN = 0.04
SUPERSAMPLE = 4  # shapes are drawn this much larger, then box-filtered down: anti-aliased edges

SCENE_KINDS = {"single": 0.25, "pair": 0.3, "count": 0.2, "mixed": 0.25}
CAPTION_PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ")
RELATION_WORDS = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
RELATION_ANSWERS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
PLURALS = {"cross": "crosses"}
NEGATIVE_KINDS = ("random", "adversarial", "binding")  # how an absent object is picked (POPE-style)
QUESTION_TYPES = ("colour", "shape", "count", "position", "relation", "size", "existence")
# Whether a caption fits the picture (match_question); asked only when write_dataset is told to.
MATCH = "match"


def _outline(shape: str) -> tuple[tuple[float, float], ...]:
    """Polygon of a shape, stretched to fill the square [-0.5, 0.5]^2 (y down, no rotation)."""
    if shape == "circle":
        points = [(math.cos(2 * math.pi * i / 96), math.sin(2 * math.pi * i / 96)) for i in range(96)]
    elif shape == "square":
        points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        points = [(0, -1), (1, 1), (-1, 1)]
    elif shape == "star":  # five points, inner radius 0.45 of the outer
        points = [
            ((1 if i % 2 == 0 else 0.45) * math.sin(math.pi * i / 5), -(1 if i % 2 == 0 else 0.45) * math.cos(math.pi * i / 5))
            for i in range(10)
        ]
    elif shape == "cross":  # a plus sign, arms a third of the side wide
        a = 1 / 3
        points = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return tuple(((x - x0) / w - 0.5, (y - y0) / h - 0.5) for x, y in points)


OUTLINES = {shape: _outline(shape) for shape in SHAPES}


def polygon(shape: str, cx: float, cy: float, width: float, height: float) -> list[tuple[float, float]]:
    """Pixel-space vertices of `shape` whose bounding box has this centre and size.

    Continuous coordinates have pixel i covering [i, i + 1); PIL puts pixel centres on integers.
    """
    return [(cx + u * width - 0.5, cy + v * height - 0.5) for u, v in OUTLINES[shape]]


# ---------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str  # "small" | "large"
    x: float  # centre of the bounding box, in image sides from the left
    y: float  # ... from the top

    @property
    def side(self) -> float:
        return SIZES[self.size]

    @property
    def descriptor(self) -> tuple[str, str]:
        return self.colour, self.shape


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    def to_json(self) -> dict:
        return {"objects": [dataclasses.asdict(o) for o in self.objects]}

    @classmethod
    def from_json(cls, data: dict) -> "Scene":
        return cls(tuple(SceneObject(**o) for o in data["objects"]))


class Located(Protocol):
    """What captions and relations need of an object: scene objects and detected objects both qualify."""

    shape: str | None
    colour: str | None
    size: str | None
    x: float
    y: float


def relation(a: Located, b: Located) -> str:
    """Where `a` lies relative to `b`, along the axis on which their centres differ most."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def relation_is_clear(a: Located, b: Located) -> bool:
    return abs(abs(a.x - b.x) - abs(a.y - b.y)) >= RELATION_MARGIN


def region(obj: Located) -> str:
    """Which ninth of the image holds the centre: "top left", "top", ..., "middle", ..., "bottom right"."""
    row = ("top", "", "bottom")[min(int(obj.y * 3), 2)]
    column = ("left", "", "right")[min(int(obj.x * 3), 2)]
    return " ".join(w for w in (row, column) if w) or "middle"


def region_is_clear(obj: Located) -> bool:
    return all(abs(v - line) >= REGION_MARGIN for v in (obj.x, obj.y) for line in (1 / 3, 2 / 3))


def is_heldout_pair(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether two (colour, shape) descriptors form a composition kept out of every training split.

    A fixed tenth of all pairs, chosen by hash, so the choice does not depend on any seed.
    """
    if a == b:
        return False
    key = "|".join(sorted(f"{c} {s}" for c, s in (a, b)))
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") % 10 == 0


DESCRIPTORS = tuple((c, s) for c in COLOURS for s in SHAPES)
HELDOUT_PAIRS = tuple((a, b) for a, b in combinations(DESCRIPTORS, 2) if is_heldout_pair(a, b))


def has_heldout_pair(descriptors: list[tuple[str, str]]) -> bool:
    return any(is_heldout_pair(a, b) for a, b in combinations(set(descriptors), 2))


def scene_rng(seed: int, stream: str, index: int) -> random.Random:
    """The random source of one scene: independent of every other scene and of the split sizes."""
    return random.Random(f"janus-shapes:{seed}:{stream}:{index}")


def sample_scene(rng: random.Random, exclude_heldout: bool = False) -> Scene:
    """A random scene of 1-4 objects; `exclude_heldout` rejects scenes holding a held-out pair."""
    while True:
        descriptors = _sample_descriptors(rng)
        if exclude_heldout and has_heldout_pair(descriptors):
            continue
        sizes = [rng.choice(tuple(SIZES)) for _ in descriptors]
        # Relations are captioned only in two-object scenes, so only there must they be clear.
        centres = _layout(rng, [round(SIZES[s] * GRID) for s in sizes], clear_relations=len(descriptors) == 2)
        if centres is not None:
            objects = (SceneObject(s, c, size, x, y) for (c, s), size, (x, y) in zip(descriptors, sizes, centres))
            return Scene(tuple(objects))


def _sample_descriptors(rng: random.Random) -> list[tuple[str, str]]:
    kind = rng.choices(tuple(SCENE_KINDS), weights=tuple(SCENE_KINDS.values()))[0]
    if kind == "single":
        return [rng.choice(DESCRIPTORS)]
    if kind == "pair":
        return rng.sample(DESCRIPTORS, 2)
    if kind == "count":
        return [rng.choice(DESCRIPTORS)] * rng.randint(2, MAX_OBJECTS)
    return [rng.choice(DESCRIPTORS) for _ in range(rng.randint(3, MAX_OBJECTS))]


def _layout(rng: random.Random, sides: list[int], clear_relations: bool) -> list[tuple[float, float]] | None:
    """Centres (image sides) for boxes of these sides (grid cells); None when placement keeps failing."""
    for _ in range(50):
        boxes: list[tuple[int, int, int]] = []  # left, top, side, in grid cells
        for side in sides:
            for _ in range(50):
                left, top = (rng.randint(BORDER, GRID - BORDER - side) for _ in range(2))
                if all(_fits((left, top, side), box, clear_relations) for box in boxes):
                    boxes.append((left, top, side))
                    break
            else:
                break
        if len(boxes) == len(sides):
            return [((left + side / 2) / GRID, (top + side / 2) / GRID) for left, top, side in boxes]
    return None


def _fits(a: tuple[int, int, int], b: tuple[int, int, int], clear_relations: bool) -> bool:
    # Twice the centre offsets, so that everything stays in whole grid cells.
    dx, dy = abs(2 * a[0] + a[2] - 2 * b[0] - b[2]), abs(2 * a[1] + a[2] - 2 * b[1] - b[2])
    apart = max(dx, dy) - (a[2] + b[2]) >= 2 * GAP
    return apart and (not clear_relations or abs(dx - dy) >= 2 * RELATION_MARGIN * GRID)


def render(scene: Scene, resolution: int = 384) -> Image.Image:
    """The scene as an RGB image, anti-aliased by drawing SUPERSAMPLE times larger and box-filtering."""
    if not isinstance(resolution, int) or resolution < 16:
        raise ValueError(f"resolution must be an int >= 16, got {resolution!r}")
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw.polygon(polygon(obj.shape, obj.x * big, obj.y * big, obj.side * big, obj.side * big), fill=PALETTE[obj.colour])
    return image.reduce(SUPERSAMPLE)


# ---------------------------------------------------------------- descriptions (captions, prompts)


@dataclass(frozen=True)
class ObjectSpec:
    """What a description says of one object; None: not said."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def mismatches(self, obj: Located) -> list[str]:
        """The attributes `obj` gets wrong."""
        return [a for a in ("shape", "colour", "size") if getattr(self, a) is not None and getattr(obj, a) != getattr(self, a)]


@dataclass(frozen=True)
class Description:
    """A caption or prompt as clauses: exactly these objects, and `objects[0]` `relation` `objects[1]`."""

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def text(self, rng: random.Random | None = None) -> str:
        """The words; with `rng` a varied training caption, without it the canonical prompt."""
        if self.relation is not None:
            words = RELATION_WORDS[self.relation]
            first, second = (_phrase(spec, 1) for spec in self.objects)
            text = f"{first} {rng.choice(words) if rng else words[0]} {second}"
        else:
            groups = Counter(self.objects)  # first-seen order
            text = _join([_phrase(spec, n) for spec, n in groups.items()])
        return (rng.choice(CAPTION_PREFIXES) if rng else "") + text


def _phrase(spec: ObjectSpec, count: int) -> str:
    words = [w for w in (spec.size, spec.colour, plural(spec.shape) if count > 1 else spec.shape) if w]
    article = COUNT_WORDS[count] if count > 1 else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([article, *words])


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def parse_description(text: str) -> Description:
    """The description that `text` words as `Description.text` does: a prompt, or a training caption with
    its prefix and relation wording. Its category is "parsed". Raises ValueError for other text."""
    words = " ".join(text.lower().replace(",", " , ").split()).removesuffix(".").strip()
    for prefix in CAPTION_PREFIXES:
        if prefix and words.startswith(prefix):
            words = words[len(prefix) :]
    wordings = sorted(((w, r) for r, ws in RELATION_WORDS.items() for w in ws), key=lambda item: -len(item[0]))
    for wording, relation_ in wordings:
        first, found, second = words.partition(f" {wording} ")
        if found:
            objects = _parse_phrase(first, text) + _parse_phrase(second, text)
            if len(objects) != 2:
                raise ValueError(f"{text!r}: a relation must be between two single objects")
            return Description("parsed", tuple(objects), relation_)
    phrases = [p for part in words.split(" , ") for p in part.split(" and ")]
    return Description("parsed", tuple(spec for phrase in phrases for spec in _parse_phrase(phrase, text)))


def _parse_phrase(phrase: str, text: str) -> list[ObjectSpec]:
    """ "two small red circles" -> two ObjectSpecs (the inverse of _phrase)."""
    words = phrase.split()
    article = words[0] if words else ""
    count = 1 if article in ("a", "an") else COUNT_WORDS.index(article) if article in COUNT_WORDS[2:] else 0
    size = words[1] if len(words) > 2 and words[1] in SIZES else None
    colour = words[-2] if len(words) > 1 and words[-2] in PALETTE else None
    shapes = {(plural(s) if count > 1 else s): s for s in SHAPES}
    if not count or words[-1] not in shapes or len(words) != 2 + (size is not None) + (colour is not None):
        raise ValueError(
            f"{text!r}: cannot read {phrase!r} as objects; expected a count (a, an, two, ...), optionally a size "
            f"({', '.join(SIZES)}) and a colour ({', '.join(COLOURS)}), then a shape ({', '.join(SHAPES)}; plural after a number)"
        )
    return [ObjectSpec(shapes[words[-1]], colour, size)] * count


def failed_clauses(description: Description, objects: list[Located]) -> list[str]:
    """The clauses of `description` that `objects` break, as "clause: detail"; empty when it holds.

    Clauses: "count" (exactly the objects described), "shape", "colour", "size" (of each described
    object, under the best matching of objects to descriptions) and "relation".
    """
    specs = description.objects
    if len(objects) != len(specs):
        return [f"count: {len(objects)} objects, expected {len(specs)}"]
    best: list[str] | None = None
    for order in permutations(range(len(specs))):
        failures = [
            f"{a}: {_phrase(spec, 1)} is {getattr(objects[order[i]], a)}"
            for i, spec in enumerate(specs)
            for a in spec.mismatches(objects[order[i]])
        ]
        if description.relation is not None:
            seen = relation(objects[order[0]], objects[order[1]])
            if seen != description.relation:
                failures.append(f"relation: {seen}, expected {description.relation}")
        if best is None or len(failures) < len(best):
            best = failures
    return best or []


def scene_for(description: Description, rng: random.Random) -> Scene:
    """A random scene that `description` holds for (attributes it leaves open are drawn at random)."""
    while True:
        specs = description.objects
        colours = [spec.colour or rng.choice(COLOURS) for spec in specs]
        sizes = [spec.size or rng.choice(tuple(SIZES)) for spec in specs]
        centres = _layout(rng, [round(SIZES[s] * GRID) for s in sizes], clear_relations=description.relation is not None)
        if centres is None:
            continue
        scene = Scene(tuple(SceneObject(spec.shape, c, s, x, y) for spec, c, s, (x, y) in zip(specs, colours, sizes, centres)))
        if not failed_clauses(description, list(scene.objects)):
            return scene


def raster_position(obj: SceneObject, tokens_per_side: int) -> tuple[int, float]:
    """Where an image generated token by token, row by row, on a grid of tokens_per_side squared
    starts drawing `obj`: the token row of its top edge, then how far left it is."""
    return int((obj.y - obj.side / 2) * tokens_per_side + 1e-9), obj.x


def caption(scene: Scene, rng: random.Random, raster: int | None = None) -> Description:
    """A description that holds for the scene, drawn from the templates that fit it.

    Objects are named in random order, or with `raster` (tokens per image side) in the order an image
    generated row by row on that token grid starts drawing them (`raster_position`), except in
    "above"/"below" captions, where the relation already says which comes first. Named in random
    order, "a circle and a square" leaves the generator free to start with either, and a model that
    has not settled which it drew first draws the second object with the first one's shape half of
    the time (docs/default_model.md, "Naming objects in drawing order")."""
    objects = list(scene.objects)
    rng.shuffle(objects)  # the order things are named in
    named = sorted(objects, key=lambda o: raster_position(o, raster)) if raster else objects
    with_size = rng.random() < 0.25

    def specs(colour: bool = True, objects: list[SceneObject] = named) -> tuple[ObjectSpec, ...]:
        return tuple(ObjectSpec(o.shape, o.colour if colour else None, o.size if with_size else None) for o in objects)

    distinct = len({o.descriptor for o in objects})
    if len(objects) == 1:
        candidates = [Description("colors", specs()), Description("single_object", specs(colour=False))]
    elif distinct == 1:
        candidates = [Description("counting", specs()), Description("counting", specs(colour=False))]
    elif len(objects) == 2:
        candidates = [Description("color_attr", specs()), Description("two_object", specs(colour=False))]
        if relation_is_clear(*objects):
            pair = named if relation(*named) in ("left of", "right of") else objects
            candidates.append(Description("position", specs(objects=pair), relation(*pair)))
    else:
        candidates = [Description("mixed", specs()), Description("mixed", specs(colour=False))]
    return rng.choice(candidates)


# ---------------------------------------------------------------- questions


@dataclass(frozen=True)
class QA:
    type: str  # one of QUESTION_TYPES, or MATCH
    question: str
    answer: str
    negative: str | None = None  # existence questions answered "no": which NEGATIVE_KINDS picked the object


def object_name(obj: SceneObject) -> str:
    """How questions name an object: "<colour> <shape>"."""
    return f"{obj.colour} {obj.shape}"


def named_objects(scene: Scene) -> list[SceneObject]:
    """The objects that "the <colour> <shape>" names unambiguously."""
    return [o for o in scene.objects if sum(p.descriptor == o.descriptor for p in scene.objects) == 1]


def question(scene: Scene, kind: str, rng: random.Random, answer_yes: bool | None = None, negative: str | None = None) -> QA | None:
    """A question of type `kind` about the scene with its exact answer, or None when none fits.

    Existence questions: `answer_yes` and `negative` pick the answer and, for "no", how the absent
    object is chosen (when not given: at random, among the kinds the scene allows).
    """
    if kind == "existence":
        return _existence(scene, rng, rng.random() < 0.5 if answer_yes is None else answer_yes, negative)
    if kind not in _ASK:
        raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")
    return _ASK[kind](scene, rng)


# The wording of questions, shared by the training questions, clause_questions and bench/probe_binding.py.
def how_many(what: str) -> str:
    return f"How many {what} are there?"


def what_colour(shape: str, count: int) -> str:
    return f"What colour is the {shape}?" if count == 1 else f"What colour are the {plural(shape)}?"


def what_shape(colour: str, count: int) -> str:
    return f"What shape is the {colour} object?" if count == 1 else f"What shape are the {colour} objects?"


def has_lookalike(colour: str, shape: str, objects: Sequence[SceneObject]) -> bool:
    """Whether another of `objects` has this shape in another colour, so only the colour tells them apart."""
    return any(o.shape == shape and o.colour != colour for o in objects)


def where_is(name: str) -> str:
    return f"Where is the {name} in the image?"


def where_relative(a: str, b: str) -> str:
    return f"Where is the {a} relative to the {b}?"


def _attribute_questions(objects: Sequence[SceneObject | ObjectSpec], attribute: str) -> list[QA]:
    """The questions asking `attribute` ("colour" or "shape") of each value of the other one whose
    objects all share one `attribute`: "What colour is the circle?", "What shape is the red object?"."""
    by, wording = ("shape", what_colour) if attribute == "colour" else ("colour", what_shape)
    questions = []
    for value in sorted({getattr(o, by) for o in objects}):
        same = [o for o in objects if getattr(o, by) == value]
        if len({getattr(o, attribute) for o in same}) == 1:
            questions.append(QA(attribute, wording(value, len(same)), getattr(same[0], attribute)))
    return questions


def _colour_question(scene: Scene, rng: random.Random) -> QA | None:
    questions = _attribute_questions(scene.objects, "colour")
    return rng.choice(questions) if questions else None


def _shape_question(scene: Scene, rng: random.Random) -> QA | None:
    questions = _attribute_questions(scene.objects, "shape")
    return rng.choice(questions) if questions else None


def _count_question(scene: Scene, rng: random.Random) -> QA:
    objects = scene.objects
    target = rng.choice(("objects", "shape", "colour"))
    if target == "objects":
        return QA("count", how_many("objects"), COUNT_WORDS[len(objects)])
    # Mostly ask about what is there, sometimes about what is not (answer "zero").
    if target == "shape":
        shape = rng.choice([o.shape for o in objects]) if rng.random() < 0.8 else rng.choice(SHAPES)
        return QA("count", how_many(plural(shape)), COUNT_WORDS[sum(o.shape == shape for o in objects)])
    colour = rng.choice([o.colour for o in objects]) if rng.random() < 0.8 else rng.choice(COLOURS)
    return QA("count", how_many(f"{colour} objects"), COUNT_WORDS[sum(o.colour == colour for o in objects)])


def _position_question(scene: Scene, rng: random.Random) -> QA | None:
    clear = [o for o in named_objects(scene) if region_is_clear(o)]
    if not clear:
        return None
    obj = rng.choice(clear)
    return QA("position", where_is(object_name(obj)), region(obj))


def _relation_question(scene: Scene, rng: random.Random) -> QA | None:
    named = named_objects(scene)
    pairs = [(a, b) for a in named for b in named if a is not b and relation_is_clear(a, b)]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    return QA("relation", where_relative(object_name(a), object_name(b)), RELATION_ANSWERS[relation(a, b)])


def _size_question(scene: Scene, rng: random.Random) -> QA | None:
    named = named_objects(scene)
    if not named:
        return None
    obj = rng.choice(named)
    return QA("size", f"Is the {object_name(obj)} small or large?", obj.size)


_ASK = {
    "colour": _colour_question,
    "shape": _shape_question,
    "count": _count_question,
    "position": _position_question,
    "relation": _relation_question,
    "size": _size_question,
}


def _existence(scene: Scene, rng: random.Random, answer_yes: bool, negative: str | None) -> QA | None:
    present = {o.descriptor for o in scene.objects}
    if answer_yes:
        colour, shape = rng.choice(sorted(present))
        return QA("existence", f"Is there {_phrase(ObjectSpec(shape, colour), 1)} in the image?", "yes")
    absent = [d for d in DESCRIPTORS if d not in present]
    colours, shapes = {c for c, _ in present}, {s for _, s in present}
    pools = {
        "random": absent,
        # shares its colour or its shape with something in the picture, not both
        "adversarial": [(c, s) for c, s in absent if (c in colours) != (s in shapes)],
        # its colour and its shape are both in the picture, on different objects
        "binding": [(c, s) for c, s in absent if c in colours and s in shapes],
    }
    kind = negative or rng.choice([k for k in NEGATIVE_KINDS if pools[k]])
    if not pools[kind]:
        return None
    colour, shape = rng.choice(pools[kind])
    return QA("existence", f"Is there {_phrase(ObjectSpec(shape, colour), 1)} in the image?", "no", kind)


def match_question(scene: Scene, rng: random.Random, answer_yes: bool | None = None) -> QA:
    """Does the image show a caption (MATCH_QUESTION)? For "yes" a caption of the scene; for "no" one
    made false by a single edit of the kinds image generation gets wrong: an object's shape, colour or
    size changed, two objects' colours swapped, an object added or dropped, or the relation changed.
    `answer_yes` None: either, at random."""
    true = caption(scene, rng)
    if answer_yes is None:
        answer_yes = rng.random() < 0.5
    shown = true if answer_yes else falsified(true, list(scene.objects), rng)
    return QA(MATCH, MATCH_QUESTION.format(shown.text(rng)), "yes" if answer_yes else "no")


def falsified(description: Description, objects: list[Located], rng: random.Random) -> Description:
    """`description` with one edit that makes it false of `objects`."""
    while True:
        specs, relation_ = list(description.objects), description.relation
        i = rng.randrange(len(specs))
        edit = rng.choice(("shape", "colour", "size", "swap", "count", "relation"))
        if edit == "shape":
            specs[i] = dataclasses.replace(specs[i], shape=rng.choice(SHAPES))
        elif edit == "colour" and specs[i].colour is not None:
            specs[i] = dataclasses.replace(specs[i], colour=rng.choice(COLOURS))
        elif edit == "size" and specs[i].size is not None:
            specs[i] = dataclasses.replace(specs[i], size=rng.choice(tuple(SIZES)))
        elif edit == "swap" and len(specs) > 1 and specs[i].colour is not None:
            j = rng.choice([j for j in range(len(specs)) if j != i])
            specs[i], specs[j] = dataclasses.replace(specs[i], colour=specs[j].colour), dataclasses.replace(specs[j], colour=specs[i].colour)
        elif edit == "count" and relation_ is None:
            if len(specs) > 1 and (len(specs) == MAX_OBJECTS or rng.random() < 0.5):
                del specs[i]
            else:
                specs.insert(i, specs[i])
        elif edit == "relation" and relation_ is not None:
            relation_ = rng.choice([r for r in RELATIONS if r != relation_])
        else:
            continue
        edited = Description(description.category, tuple(specs), relation_)
        if failed_clauses(edited, objects):
            return edited


# The answers each type of clause question chooses among. Counts go one past a scene's most, since a
# generated image may hold an extra fragment.
ANSWER_OPTIONS: dict[str, tuple[str, ...]] = {
    "count": COUNT_WORDS[: MAX_OBJECTS + 2],
    "colour": COLOURS,
    "shape": SHAPES,
    "relation": tuple(RELATION_ANSWERS.values()),
}


def clause_questions(description: Description) -> list[QA]:
    """Questions, worded as the training questions, whose answers check the description's clauses
    (as TIFA and DSG check a prompt by visual question answering): how many objects there are in all,
    of each shape and of each colour; the colour of each shape, and the shape of each colour, that the
    description gives a single value; and the relation. Each answer is one of ANSWER_OPTIONS[type].
    Colours are asked about only when the description names every object's colour; sizes never."""
    specs = description.objects
    shapes = Counter(spec.shape for spec in specs)
    questions = [QA("count", how_many("objects"), COUNT_WORDS[len(specs)])]
    questions += [QA("count", how_many(plural(shape)), COUNT_WORDS[n]) for shape, n in shapes.items()]
    if any(spec.colour is None for spec in specs):  # an object of any colour: counting by colour tells nothing
        return questions
    colours = Counter(spec.colour for spec in specs)
    questions += [QA("count", how_many(f"{colour} objects"), COUNT_WORDS[n]) for colour, n in colours.items()]
    questions += _attribute_questions(specs, "colour") + _attribute_questions(specs, "shape")
    if description.relation is not None:
        first, second = (f"{spec.colour} {spec.shape}" for spec in specs)
        if first != second:  # else "the red circle" would name either
            questions.append(QA("relation", where_relative(first, second), RELATION_ANSWERS[description.relation]))
    return questions


def scene_questions(scene: Scene, rng: random.Random, n: int, per_type: int = 1) -> list[QA]:
    """Up to n different questions, at most `per_type` of each type (existence included, its answer yes
    or no at random). Types come in shuffled rounds, one question of each type per round, so the first
    questions cover as many types as they can."""
    questions: list[QA] = []
    asked: set[str] = set()
    for _ in range(per_type):
        kinds = list(QUESTION_TYPES)
        rng.shuffle(kinds)
        added = False
        for kind in kinds:
            qa = question(scene, kind, rng)
            if qa is not None and qa.question not in asked:
                questions.append(qa)
                asked.add(qa.question)
                added = True
            if len(questions) == n:
                return questions
        if not added:  # the scene has no further questions to give
            break
    return questions


# ---------------------------------------------------------------- text corpus

_REGION_PHRASES = {"middle": "in the middle", "left": "on the left", "right": "on the right"}


def scene_text(scene: Scene, rng: random.Random) -> str:
    """A few sentences describing the whole scene: what is where, and how named objects relate."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    parts = [
        f"{_phrase(ObjectSpec(o.shape, o.colour, o.size), 1)} {_REGION_PHRASES.get(region(o), 'at the ' + region(o))}"
        for o in objects
    ]
    count = COUNT_WORDS[len(objects)]
    opening = rng.choice(
        (
            f"A grey picture with {count} object{'s' if len(objects) > 1 else ''}: ",
            f"This image shows {count} shape{'s' if len(objects) > 1 else ''} on a grey background: ",
            f"In the picture there {'are' if len(objects) > 1 else 'is'} ",
        )
    )
    sentences = [opening + _join(parts) + "."]
    pairs = [(a, b) for a, b in combinations(named_objects(scene), 2) if relation_is_clear(a, b)]
    for a, b in rng.sample(pairs, min(2, len(pairs))):
        sentences.append(f"The {object_name(a)} is {rng.choice(RELATION_WORDS[relation(a, b)])} the {object_name(b)}.")
    return " ".join(sentences)


# ---------------------------------------------------------------- data set files


def write_dataset(
    out_dir: str | Path,
    n_scenes: int,
    seed: int = 0,
    resolution: int = 384,
    splits: dict[str, float] | None = None,
    questions_per_scene: int = 4,
    questions_per_type: int = 1,
    match_questions: int = 0,
    raster: int | None = None,
) -> dict[str, dict[str, Path]]:
    """Write splits of scenes in the training data format (docs/data.md) and return their manifests.

    Each split gets `round(n_scenes * fraction)` scenes from its own seed stream, written to
    `out_dir/<split>/`: `images/NNNNNN.png`, `understanding.jsonl` (one question per record),
    `generation.jsonl` (one caption per scene), `text.jsonl` (one description per scene) and
    `scenes.jsonl` (the ground truth). The split named "train" holds no held-out pair (HELDOUT_PAIRS).
    `match_questions` adds that many `match_question`s per scene, each at a random place among the others.
    `raster` (tokens per image side) names each caption's objects in drawing order (`caption`).
    """
    splits = splits if splits is not None else {"train": 0.9, "heldout": 0.1}
    out = Path(out_dir)
    manifests = {}
    for split, fraction in splits.items():
        directory = out / split
        (directory / "images").mkdir(parents=True, exist_ok=True)
        lines: dict[str, list[str]] = {"understanding": [], "generation": [], "text": [], "scenes": []}
        for i in range(round(n_scenes * fraction)):
            rng = scene_rng(seed, split, i)
            scene = sample_scene(rng, exclude_heldout=split == "train")
            name = f"images/{i:06d}.png"
            render(scene, resolution).save(directory / name)
            questions = scene_questions(scene, rng, questions_per_scene, questions_per_type)
            for _ in range(match_questions):
                questions.insert(rng.randrange(len(questions) + 1), match_question(scene, rng))
            for qa in questions:
                conversation = [
                    {"role": "user", "content": f"{IMAGE_TOKEN}\n{qa.question}"},
                    {"role": "assistant", "content": qa.answer},
                ]
                lines["understanding"].append(_json({"kind": "understanding", "images": [name], "conversation": conversation}))
            lines["generation"].append(_json({"kind": "generation", "caption": caption(scene, rng, raster).text(rng), "image": name}))
            lines["text"].append(_json({"kind": "text", "text": scene_text(scene, rng)}))
            lines["scenes"].append(_json({"image": name, **scene.to_json()}))
        manifests[split] = {}
        for kind, records in lines.items():
            path = directory / f"{kind}.jsonl"
            path.write_text("".join(line + "\n" for line in records), encoding="utf-8")
            manifests[split][kind] = path
    return manifests


def binding_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """Questions that need each object's colour bound to its shape, in random order: the shape of every
    colour and the colour of every shape that have one answer, up to two relations, and two questions of
    the other types (count, position, size, existence)."""
    questions = _attribute_questions(scene.objects, "shape") + _attribute_questions(scene.objects, "colour")
    relations: set[str] = set()
    for _ in range(4):
        qa = _relation_question(scene, rng)
        if qa is not None and qa.question not in relations and len(relations) < 2:
            relations.add(qa.question)
            questions.append(qa)
    asked = {qa.question for qa in questions}
    others = [qa for qa in scene_questions(scene, rng, 6) if qa.type in ("count", "position", "size", "existence") and qa.question not in asked]
    questions += others[:2]
    rng.shuffle(questions)
    return questions


def write_binding_dataset(out_dir: str | Path, n_scenes: int, seed: int, resolution: int = 384) -> dict[str, Path]:
    """Write n_scenes training scenes of at least two shapes (no held-out pair) with their
    `binding_questions`, one question per record so that no earlier turn names an answer, and return
    the manifests: `understanding.jsonl` (every question), `scenes.jsonl` (the ground truth), and
    `shape_questions.jsonl`, `relation_questions.jsonl`, `position_questions.jsonl` and
    `count_questions.jsonl` (the shape-of-colour, relation, position and count questions alone, for
    drills), beside `images/NNNNNN.png`.
    Scenes come from their own seed stream, "binding" (docs/default_model.md, "Binding colour to
    shape")."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    drills = {"count": "count_questions", "position": "position_questions", "relation": "relation_questions", "shape": "shape_questions"}
    records: dict[str, list[str]] = {"understanding": [], "scenes": [], **{name: [] for name in drills.values()}}  # the last one marks a finished set
    written = index = 0
    while written < n_scenes:
        rng = scene_rng(seed, "binding", index)
        index += 1
        scene = sample_scene(rng, exclude_heldout=True)
        if len({o.shape for o in scene.objects}) < 2:  # one shape answers every shape question
            continue
        questions = binding_questions(scene, rng)
        name = f"images/{written:06d}.png"
        render(scene, resolution).save(out / name)
        records["scenes"].append(_json({"image": name, **scene.to_json()}))
        for qa in questions:
            conversation = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{qa.question}"}, {"role": "assistant", "content": qa.answer}]
            line = _json({"kind": "understanding", "images": [name], "conversation": conversation})
            records["understanding"].append(line)
            if qa.type in drills:
                records[drills[qa.type]].append(line)
        written += 1
    manifests = {}
    for kind, lines in records.items():
        manifests[kind] = out / f"{kind}.jsonl"
        manifests[kind].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return manifests


# The object names in `where_is` and `where_relative` questions.
_WHERE_IS = re.compile(r"Where is the (\w+) (\w+) in the image\?")
_WHERE_RELATIVE = re.compile(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?")


def write_lookalike_questions(binding_dir: str | Path) -> dict[str, Path]:
    """From a `write_binding_dataset` set, the position and relation questions that name an object
    with a look-alike, another object of its shape in another colour, so that only the colour tells
    them apart (docs/default_model.md, "Finding the named object among look-alikes"). Writes
    `lookalike_questions.jsonl` (position questions, then relation questions, in file order) and
    `lookalike_position.jsonl` (the position ones) beside the set's images; returns both paths."""
    out = Path(binding_dir)
    objects = {}
    with open(out / "scenes.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            objects[record["image"]] = Scene.from_json(record).objects
    chosen: dict[str, list[str]] = {"position": [], "relation": []}
    for kind, pattern in (("position", _WHERE_IS), ("relation", _WHERE_RELATIVE)):
        with open(out / f"{kind}_questions.jsonl", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                question = record["conversation"][0]["content"].removeprefix(f"{IMAGE_TOKEN}\n")
                words = pattern.fullmatch(question)
                if words is None:
                    raise ValueError(f"not a {kind} question: {question!r}")
                named = list(zip(words.groups()[::2], words.groups()[1::2]))  # (colour, shape) pairs
                if any(has_lookalike(colour, shape, objects[record["images"][0]]) for colour, shape in named):
                    chosen[kind].append(line)
    manifests = {"questions": out / "lookalike_questions.jsonl", "position": out / "lookalike_position.jsonl"}
    manifests["questions"].write_text("".join(chosen["position"] + chosen["relation"]), encoding="utf-8")
    manifests["position"].write_text("".join(chosen["position"]), encoding="utf-8")
    return manifests


# Which subset counts `write_count_questions` keeps, by answer: every count of two or more, this share
# of the ones and this share of the zeros (each absent shape and colour), so that counts of two or more,
# the ones the model gets wrong, are 30% of the subset answers on the build's scenes, where asking
# about every shape and colour present and one absent of each gives 12%.
COUNT_KEEP_ONE = 0.35
COUNT_KEEP_ZERO = 0.06


def write_count_questions(dataset_dir: str | Path, seed: int) -> Path:
    """From a set's `scenes.jsonl`, one conversation of count questions per scene: how many objects
    there are in all, and how many of each shape and colour, kept by answer (COUNT_KEEP_ONE,
    COUNT_KEEP_ZERO), in random order (docs/default_model.md, "Counting (phase 10)"). Writes
    `count_conversations.jsonl` beside the set's images and returns its path."""
    out = Path(dataset_dir)
    rng = random.Random(seed)
    keep = {0: COUNT_KEEP_ZERO, 1: COUNT_KEEP_ONE}
    lines = []
    with open(out / "scenes.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            objects = Scene.from_json(record).objects
            shapes, colours = Counter(o.shape for o in objects), Counter(o.colour for o in objects)
            subsets = [(how_many(plural(shape)), n) for shape, n in shapes.items()]
            subsets += [(how_many(f"{colour} objects"), n) for colour, n in colours.items()]
            subsets += [(how_many(plural(shape)), 0) for shape in SHAPES if shape not in shapes]
            subsets += [(how_many(f"{colour} objects"), 0) for colour in COLOURS if colour not in colours]
            questions = [(how_many("objects"), len(objects))] + [(q, n) for q, n in subsets if n >= 2 or rng.random() < keep[n]]
            rng.shuffle(questions)
            turns = []
            for question, n in questions:
                turns += [{"role": "user", "content": question}, {"role": "assistant", "content": COUNT_WORDS[n]}]
            turns[0]["content"] = f"{IMAGE_TOKEN}\n{turns[0]['content']}"
            lines.append(_json({"kind": "understanding", "images": [record["image"]], "conversation": turns}))
    path = out / "count_conversations.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def merge_conversations(src: str | Path, dst: str | Path) -> int:
    """Write `src`'s understanding records (one question each, as `write_dataset` writes them) to `dst`
    as one multi-turn conversation per image, its questions in file order; return how many.

    The image's tokens then come once for all of its questions, so a training step of the same length
    carries nearly three times as many answers (docs/default_model.md, "Conversations").
    """
    conversations: dict[tuple[str, ...], list[dict]] = {}
    with open(src, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            images, turns = tuple(record["images"]), record["conversation"]
            if images in conversations:  # the image goes with the first question only
                question = turns[0]["content"].replace(f"{IMAGE_TOKEN}\n", "", len(images))
                turns = [{**turns[0], "content": question}, *turns[1:]]
            conversations.setdefault(images, []).extend(turns)
    lines = [_json({"kind": "understanding", "images": list(images), "conversation": turns}) for images, turns in conversations.items()]
    Path(dst).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def _json(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)
