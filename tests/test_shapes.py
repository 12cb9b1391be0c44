"""The shapes world: determinism, layout rules, and ground truth that agrees with the scene."""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch
from PIL import Image

from janus.data import read_records
from janus.eval.clause_judge import clause_judge
from janus.eval.shapes_eval import GEN_CATEGORIES, category_prompts
from janus.processing.chat import MATCH_QUESTION
from janus.processing.tokenizer import IMAGE_TOKEN
from janus.data.shapes import (
    ANSWER_OPTIONS,
    BACKGROUND,
    COUNT_WORDS,
    GAP,
    GRID,
    HELDOUT_PAIRS,
    PALETTE,
    QA,
    RELATION_ANSWERS,
    Scene,
    SceneObject,
    binding_questions,
    caption,
    clause_questions,
    failed_clauses,
    falsified,
    has_heldout_pair,
    match_question,
    merge_conversations,
    object_name,
    parse_description,
    plural,
    raster_position,
    region,
    relation,
    relation_is_clear,
    render,
    sample_scene,
    scene_questions,
    scene_for,
    scene_rng,
    scene_text,
    write_binding_dataset,
    write_count_questions,
    write_dataset,
    write_lookalike_questions,
    where_is,
    where_relative,
)

SCENES = [sample_scene(scene_rng(3, "test", i)) for i in range(400)]


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    write_dataset(tmp_path / "a", 24, seed=5, resolution=32)
    write_dataset(tmp_path / "b", 24, seed=5, resolution=32)
    write_dataset(tmp_path / "c", 24, seed=6, resolution=32)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["train/generation.jsonl"] != c["train/generation.jsonl"]
    assert a["train/images/000000.png"] != c["train/images/000000.png"]


def test_dataset_files_load_as_training_records(tmp_path):
    manifests = write_dataset(tmp_path, 40, seed=1, resolution=64, splits={"train": 0.75, "heldout": 0.25})
    assert set(manifests) == {"train", "heldout"}
    for split, n in (("train", 30), ("heldout", 10)):
        skipped = Counter()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a skipped record warns
            records = {kind: list(read_records(manifests[split][kind], skipped)) for kind in ("understanding", "text", "generation")}
        assert not skipped
        assert len(records["generation"]) == len(records["text"]) == n
        assert n * 3 <= len(records["understanding"]) <= n * 4
        assert all(r.images[0].size == (64, 64) for r in records["generation"])
        # the ground truth renders to exactly the image on disk
        truth = [json.loads(line) for line in manifests[split]["scenes"].read_text().splitlines()]
        for row in truth[:5]:
            on_disk = np.asarray(Image.open(tmp_path / split / row["image"]).convert("RGB"))
            assert np.array_equal(on_disk, np.asarray(render(Scene.from_json(row), 64)))
    # the held-out split comes from its own seed stream
    train, heldout = (
        {json.dumps(json.loads(line)["objects"]) for line in manifests[split]["scenes"].read_text().splitlines()}
        for split in ("train", "heldout")
    )
    assert not train & heldout


def test_merged_conversations_keep_every_question_in_order_with_the_image_once(tmp_path):
    manifests = write_dataset(tmp_path, 20, seed=3, resolution=32, splits={"train": 1.0})
    singles = [json.loads(line) for line in manifests["train"]["understanding"].read_text().splitlines()]
    merged_path = tmp_path / "train" / "conversations.jsonl"  # image paths are relative to the manifest
    assert merge_conversations(manifests["train"]["understanding"], merged_path) == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped record warns
        merged = list(read_records(merged_path, Counter()))
    assert [r.data["images"] for r in merged] == [[f"images/{i:06d}.png"] for i in range(20)]
    for record in merged:
        own = [s["conversation"] for s in singles if s["images"] == record.data["images"]]
        turns = record.data["conversation"]
        assert len(own) >= 3 and len(turns) == 2 * len(own)
        assert [t["content"] for t in turns] == [own[0][0]["content"], own[0][1]["content"]] + [
            t["content"].removeprefix(f"{IMAGE_TOKEN}\n") for conversation in own[1:] for t in conversation
        ]
        assert sum(t["content"].count(IMAGE_TOKEN) for t in turns) == 1
        assert turns[0]["content"].startswith(f"{IMAGE_TOKEN}\n")
        assert [t["role"] for t in turns] == ["user", "assistant"] * len(own)



def test_training_scenes_hold_no_heldout_pair():
    assert 40 <= len(HELDOUT_PAIRS) <= 120
    train = [sample_scene(scene_rng(0, "train", i), exclude_heldout=True) for i in range(300)]
    assert not any(has_heldout_pair([o.descriptor for o in s.objects]) for s in train)
    assert any(has_heldout_pair([o.descriptor for o in s.objects]) for s in SCENES)  # they do occur otherwise


def test_layout_rules():
    counts = Counter(len(s.objects) for s in SCENES)
    assert set(counts) == {1, 2, 3, 4}
    for scene in SCENES:
        for o in scene.objects:
            assert 1 / GRID <= o.x - o.side / 2 and o.x + o.side / 2 <= 1 - 1 / GRID
            assert 1 / GRID <= o.y - o.side / 2 and o.y + o.side / 2 <= 1 - 1 / GRID
        for a, b in combinations(scene.objects, 2):
            assert max(abs(a.x - b.x), abs(a.y - b.y)) - (a.side + b.side) / 2 >= GAP / GRID - 1e-9


def test_render_uses_exact_palette_and_background():
    for scene in SCENES[:50]:
        image = np.asarray(render(scene, 64)).reshape(-1, 3)
        colours = Counter(map(tuple, image))
        assert colours.most_common(1)[0][0] == BACKGROUND
        for o in scene.objects:
            centre = np.asarray(render(scene, 64))[int(o.y * 64), int(o.x * 64)]
            if o.shape != "star" and o.shape != "triangle":  # thin near the box centre at the edges
                assert tuple(centre) == PALETTE[o.colour]
    assert render(SCENES[0], 384).size == (384, 384)
    with pytest.raises(ValueError):
        render(SCENES[0], 8)


def test_captions_hold_for_their_scene():
    categories = Counter()
    for i, scene in enumerate(SCENES):
        rng = scene_rng(4, "captions", i)
        description = caption(scene, rng)
        categories[description.category] += 1
        assert failed_clauses(description, list(scene.objects)) == []
        text = description.text(rng)
        for spec in description.objects:
            assert spec.shape in text and (spec.colour is None or spec.colour in text)
            assert spec.size is None or spec.size in text
    assert set(categories) == {"single_object", "two_object", "counting", "colors", "position", "color_attr", "mixed"}


def test_raster_captions_name_objects_in_drawing_order():
    relations = Counter()
    for i, scene in enumerate(SCENES):
        description = caption(scene, scene_rng(4, "captions", i), raster=8)
        assert failed_clauses(description, list(scene.objects)) == []
        if len(description.objects) != 2 or description.category == "counting":
            continue
        first = [o for o in scene.objects if not description.objects[0].mismatches(o)]
        second = [o for o in scene.objects if not description.objects[1].mismatches(o)]
        drawn_first = min(scene.objects, key=lambda o: raster_position(o, 8))
        relations[description.relation] += 1
        if description.relation in ("above", "below"):  # the word says which is drawn first
            continue
        # The first-named object is the one drawn first (where both fit the words, either may be).
        assert drawn_first in first and (len(second) == 2 or drawn_first not in second), description
    assert min(relations.values()) > 2 and set(relations) == {None, "left of", "right of", "above", "below"}
    # Token rows of 1/8: the small square's top edge (row 1) is above the large circle's (row 2), so
    # it is drawn first though its centre is lower; in one row the left one comes first.
    square, circle = SceneObject("square", "red", "small", 0.75, 0.3), SceneObject("circle", "blue", "large", 0.25, 0.45)
    assert raster_position(square, 8) == (1, 0.75) and raster_position(circle, 8) == (2, 0.25)
    assert [o.shape for o in sorted([circle, square], key=lambda o: raster_position(o, 2))] == ["circle", "square"]
    for seed in range(10):
        assert caption(Scene((circle, square)), scene_rng(seed, "captions", 0), raster=8).objects[0].shape == "square"


def test_raster_datasets_differ_from_plain_ones_only_in_generation_captions(tmp_path):
    write_dataset(tmp_path / "plain", 40, seed=5, resolution=32, splits={"train": 1.0})
    write_dataset(tmp_path / "raster", 40, seed=5, resolution=32, splits={"train": 1.0}, raster=8)
    plain, raster = _files(tmp_path / "plain"), _files(tmp_path / "raster")
    assert {k for k in plain if plain[k] != raster[k]} == {"train/generation.jsonl"}
    lines = zip(plain["train/generation.jsonl"].splitlines(), raster["train/generation.jsonl"].splitlines())
    assert sum(a != b for a, b in lines) > 5  # about half the scenes of several objects are named the other way round


def _objects(scene, colour=None, shape=None):
    return [o for o in scene.objects if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]


def _named(scene, name):
    """The one object of that colour and shape, else None."""
    colour, shape = name.split()
    matching = _objects(scene, colour, shape)
    return matching[0] if len(matching) == 1 else None


def _true_answer(scene, qa):
    """The answer to a question recomputed from its words and the scene's objects; None when the
    question does not apply (it names nothing, or something ambiguous)."""
    q = qa.question
    if qa.type == "colour":
        shape = re.match(r"What colour (?:is|are) the (\w+)\?", q).group(1)
        colours = {o.colour for o in scene.objects if shape in (o.shape, plural(o.shape))}
        return colours.pop() if len(colours) == 1 else None
    if qa.type == "shape":
        colour = re.match(r"What shape (?:is|are) the (\w+) object", q).group(1)
        shapes = {o.shape for o in _objects(scene, colour)}
        return shapes.pop() if len(shapes) == 1 else None
    if qa.type == "count":
        what = re.match(r"How many (.+) are there\?", q).group(1)
        if what == "objects":
            return COUNT_WORDS[len(scene.objects)]
        if what.endswith(" objects"):
            return COUNT_WORDS[len(_objects(scene, colour=what.split()[0]))]
        return COUNT_WORDS[sum(plural(o.shape) == what for o in scene.objects)]
    if qa.type == "position":
        obj = _named(scene, re.match(r"Where is the (\w+ \w+) in the image\?", q).group(1))
        return region(obj) if obj else None
    if qa.type == "relation":
        a, b = (_named(scene, name) for name in re.match(r"Where is the (\w+ \w+) relative to the (\w+ \w+)\?", q).groups())
        return RELATION_ANSWERS[relation(a, b)] if a and b and relation_is_clear(a, b) else None
    if qa.type == "size":
        obj = _named(scene, re.match(r"Is the (\w+ \w+) small", q).group(1))
        return obj.size if obj else None
    colour, shape = re.match(r"Is there an? (\w+) (\w+) in the image\?", q).groups()
    return "yes" if _objects(scene, colour, shape) else "no"


def test_questions_agree_with_the_scene():
    """Each answer recomputed independently from the question's words and the scene's objects."""
    seen = Counter()
    for i, scene in enumerate(SCENES):
        for qa in scene_questions(scene, scene_rng(4, "questions", i), 12, per_type=3):
            seen[qa.type, qa.negative] += 1
            assert qa.answer == _true_answer(scene, qa)
            if qa.type == "existence" and qa.negative == "adversarial":
                colour, shape = re.match(r"Is there an? (\w+) (\w+) in the image\?", qa.question).groups()
                assert bool(_objects(scene, colour=colour)) != bool(_objects(scene, shape=shape))
            if qa.type == "existence" and qa.negative == "binding":
                colour, shape = re.match(r"Is there an? (\w+) (\w+) in the image\?", qa.question).groups()
                assert _objects(scene, colour=colour) and _objects(scene, shape=shape)
    assert {t for t, _ in seen} == {"colour", "shape", "count", "position", "relation", "size", "existence"}
    assert {n for _, n in seen} == {None, "random", "adversarial", "binding"}
    yes, no = sum(v for (t, n), v in seen.items() if t == "existence" and n is None), sum(v for (_, n), v in seen.items() if n)
    assert abs(yes - no) < 0.25 * (yes + no)  # about balanced


def test_binding_questions_ask_every_colour_its_shape_and_every_shape_its_colour():
    checked = 0
    for i, scene in enumerate(SCENES):
        if len({o.shape for o in scene.objects}) < 2:
            continue
        questions = binding_questions(scene, scene_rng(6, "binding", i))
        assert len({qa.question for qa in questions}) == len(questions)
        for qa in questions:
            assert qa.answer == _true_answer(scene, qa)
        types = Counter(qa.type for qa in questions)
        one_shape = {o.colour for o in scene.objects if len({p.shape for p in _objects(scene, colour=o.colour)}) == 1}
        one_colour = {o.shape for o in scene.objects if len({p.colour for p in _objects(scene, shape=o.shape)}) == 1}
        assert types["shape"] == len(one_shape) and types["colour"] == len(one_colour)
        assert types["relation"] <= 2 and sum(types[t] for t in ("count", "position", "size", "existence")) <= 2
        checked += 1
    assert checked > 100


def test_binding_dataset_asks_one_question_per_record_about_scenes_of_two_shapes_or_more(tmp_path):
    manifests = write_binding_dataset(tmp_path / "a", 30, seed=1, resolution=32)
    write_binding_dataset(tmp_path / "b", 30, seed=1, resolution=32)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    scenes = {row["image"]: Scene.from_json(row) for row in map(json.loads, manifests["scenes"].read_text().splitlines())}
    assert len(scenes) == 30
    assert all(len({o.shape for o in s.objects}) >= 2 and not has_heldout_pair([o.descriptor for o in s.objects]) for s in scenes.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped record warns
        assert len(list(read_records(manifests["understanding"], Counter()))) > 30 * 4
    lines = manifests["understanding"].read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(len(r["conversation"]) == 2 and r["images"][0] in scenes for r in records)  # no earlier turn to give an answer away
    drills = (
        ("shape_questions", r"What shape"), ("relation_questions", r" relative to the "),
        ("position_questions", r"Where is the \w+ \w+ in the image\?"), ("count_questions", r"^<image_placeholder>\nHow many "),
    )
    for drill, wording in drills:
        expected = [line for line, r in zip(lines, records) if re.search(wording, r["conversation"][0]["content"])]
        assert expected and manifests[drill].read_text().splitlines() == expected


def test_scene_questions_cover_the_types_first_then_repeat_them_without_repeating_a_question():
    for i, scene in enumerate(SCENES[:200]):
        single = scene_questions(scene, scene_rng(5, "questions", i), 12)
        assert len({qa.type for qa in single}) == len(single)  # per_type=1: one of each type at most
        dense = scene_questions(scene, scene_rng(5, "questions", i), 12, per_type=3)
        types = Counter(qa.type for qa in dense)
        assert len(dense) <= 12 and max(types.values()) <= 3
        assert len({qa.question for qa in dense}) == len(dense)
        # The first round is the per_type=1 draw itself; later rounds only add.
        assert [qa.question for qa in dense[: len(single)]] == [qa.question for qa in single]
        assert len(dense) >= len(single)
    counts = [len(scene_questions(s, scene_rng(5, "questions", i), 12, per_type=3)) for i, s in enumerate(SCENES)]
    assert sum(counts) / len(counts) > 8  # repeated types do give most scenes far more than seven


def _edit_kind(true, false):
    """Which single edit turns description `true` into `false`."""
    if false.relation != true.relation:
        return "relation"
    if len(false.objects) != len(true.objects):
        return "count"
    changed = [(a, b) for a, b in zip(true.objects, false.objects) if a != b]
    if len(changed) == 2:
        assert [a.colour for a, _ in changed] == [b.colour for _, b in changed][::-1]
        return "swap"
    ((a, b),) = changed
    (kind,) = [k for k in ("shape", "colour", "size") if getattr(a, k) != getattr(b, k)]
    return kind


def test_falsified_captions_are_false_by_one_edit_of_each_kind():
    kinds = Counter()
    for i, scene in enumerate(SCENES):
        rng = scene_rng(4, "match", i)
        true = caption(scene, rng)
        false = falsified(true, list(scene.objects), rng)
        assert failed_clauses(false, list(scene.objects))
        kinds[_edit_kind(true, false)] += 1
    assert set(kinds) == {"shape", "colour", "size", "swap", "count", "relation"}


def test_match_questions_ask_about_a_true_or_a_falsified_caption():
    answers = Counter()
    for i, scene in enumerate(SCENES[:200]):
        for yes in (True, False):
            rng, replay = scene_rng(4, "match", i), scene_rng(4, "match", i)
            qa = match_question(scene, rng, answer_yes=yes)
            true = caption(scene, replay)
            shown = true if yes else falsified(true, list(scene.objects), replay)
            assert (qa.type, qa.question, qa.answer) == ("match", MATCH_QUESTION.format(shown.text(replay)), "yes" if yes else "no")
        answers[match_question(scene, scene_rng(5, "match", i)).answer] += 1
    assert abs(answers["yes"] - answers["no"]) < 0.25 * 200


def test_write_dataset_adds_match_questions_among_the_others(tmp_path):
    manifests = write_dataset(tmp_path, 30, seed=2, resolution=32, splits={"train": 1.0}, match_questions=2)
    per_image, places = Counter(), Counter()
    questions: dict[str, list[str]] = {}
    for line in manifests["train"]["understanding"].read_text().splitlines():
        record = json.loads(line)
        question, answer = (turn["content"] for turn in record["conversation"])
        questions.setdefault(record["images"][0], []).append(question)
        if question.startswith(f"{IMAGE_TOKEN}\n" + MATCH_QUESTION.split("{")[0]):
            assert answer in ("yes", "no")
            per_image[record["images"][0]] += 1
    for image, asked in questions.items():
        places.update(i for i, q in enumerate(asked) if MATCH_QUESTION.split("{")[0] in q)
    assert set(per_image.values()) == {2} and len(per_image) == 30
    assert len(places) > 3  # not always at the end of a scene's questions
    plain = write_dataset(tmp_path / "plain", 30, seed=2, resolution=32, splits={"train": 1.0})
    assert MATCH_QUESTION.split("{")[0] not in plain["train"]["understanding"].read_text()


def _unsized(description):
    """What a description says but for sizes."""
    return Counter((spec.shape, spec.colour) for spec in description.objects), description.relation


def test_clause_questions_hold_for_a_true_description_and_catch_a_false_one():
    """Asked of a scene, the questions of a caption of it are answered as they expect; those of a caption
    falsified by one edit are not, unless the edit changed sizes only (which they do not ask about)."""
    caught = Counter()
    for i, scene in enumerate(SCENES):
        rng = scene_rng(6, "clauses", i)
        true = caption(scene, rng)
        for qa in clause_questions(true):
            assert qa.answer in ANSWER_OPTIONS[qa.type]
            assert qa.answer == _true_answer(scene, qa), (true, qa)
        false = falsified(true, list(scene.objects), rng)
        found = any(qa.answer != _true_answer(scene, qa) for qa in clause_questions(false))
        caught[_edit_kind(true, false), found] += 1
        if not found:
            assert _unsized(true) == _unsized(false), (true, false)
    assert {kind for kind, found in caught if found} == {"shape", "colour", "swap", "count", "relation"}
    assert sum(n for (kind, found), n in caught.items() if not found) < 0.1 * len(SCENES)


class SceneAnswerer:
    """A stand-in for janus.Janus that knows each rendered scene and is sure of the right answer."""

    def __init__(self, scenes):
        self.scenes = {render(scene, 64).tobytes(): scene for scene in scenes}

    def answer_logprobs(self, question, answers, images):
        kind = next(kind for kind, options in ANSWER_OPTIONS.items() if tuple(answers) == options)
        truths = [_true_answer(self.scenes[image.tobytes()], QA(kind, question, "")) for image in images]
        return torch.tensor([[0.0 if answer == truth else -20.0 for answer in answers] for truth in truths])


def test_clause_judge_of_a_perfect_answerer_prefers_the_images_that_hold():
    rights, wrongs, prompts = [], [], []
    for i, scene in enumerate(SCENES[:150]):
        rng = scene_rng(8, "judge", i)
        true = caption(scene, rng)
        false = falsified(true, list(scene.objects), rng)
        wrong = scene_for(false, rng)
        if _unsized(true) == _unsized(false) or not failed_clauses(true, list(wrong.objects)):
            continue  # a wrong size is not asked about
        rights.append(scene)
        wrongs.append(wrong)
        prompts.append(true.text(rng))
    assert len(prompts) > 100
    answerer = SceneAnswerer(rights + wrongs)
    judge = clause_judge(answerer)
    for prompt, right, wrong in zip(prompts, rights, wrongs):
        scores = judge(prompt, [render(right, 64), render(wrong, 64)])
        assert float(scores[0]) == pytest.approx(0.0, abs=1e-6) and float(scores[1]) < -19, prompt
    with pytest.raises(ValueError, match="cannot read 'a dog'"):
        judge("a dog", [render(rights[0], 64)])


def test_parse_description_reads_prompts_and_captions_back():
    for category in GEN_CATEGORIES:
        for prompt in category_prompts(category):
            parsed = parse_description(prompt.text())
            assert (parsed.objects, parsed.relation) == (prompt.objects, prompt.relation)
    for i, scene in enumerate(SCENES):
        rng = scene_rng(7, "captions", i)
        described = caption(scene, rng)
        parsed = parse_description(described.text(rng).capitalize() + ".")
        assert parsed.relation == described.relation
        assert Counter(parsed.objects) == Counter(described.objects)  # text groups equal objects
        if described.relation:
            assert parsed.objects == described.objects
    for text, problem in [
        ("a dog", "cannot read 'a dog'"),
        ("three red circle", "cannot read 'three red circle'"),
        ("a red circle left of two squares", "between two single objects"),
        ("", "cannot read ''"),
    ]:
        with pytest.raises(ValueError, match=problem):
            parse_description(text)


def test_scene_text_mentions_every_object():
    for i, scene in enumerate(SCENES[:100]):
        text = scene_text(scene, scene_rng(4, "text", i))
        for o in scene.objects:
            assert f"{o.size} {o.colour} {o.shape}" in text


def test_lookalike_questions_are_exactly_those_naming_an_object_with_a_same_shape_twin_in_another_colour(tmp_path):
    manifests = write_binding_dataset(tmp_path, 60, seed=3, resolution=32)
    # Every position and relation question each scene could hold, and whether it names a look-alike.
    lookalike: dict[tuple[str, str], bool] = {}
    for line in manifests["scenes"].read_text().splitlines():
        record = json.loads(line)
        scene = Scene.from_json(record)
        twin = {o: any(p.shape == o.shape and p.colour != o.colour for p in scene.objects) for o in scene.objects}
        for a in scene.objects:
            lookalike[record["image"], where_is(object_name(a))] = twin[a]
            for b in scene.objects:
                lookalike[record["image"], where_relative(object_name(a), object_name(b))] = twin[a] or twin[b]

    def questions(path):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return [(r["images"][0], r["conversation"][0]["content"].split("\n", 1)[1]) for r in records]

    asked = questions(manifests["position_questions"]) + questions(manifests["relation_questions"])
    out = write_lookalike_questions(tmp_path)
    chosen = questions(out["questions"])
    assert chosen == [q for q in asked if lookalike[q]]
    assert 0 < len(chosen) < len(asked)
    assert questions(out["position"]) == [q for q in chosen if q[1].endswith("in the image?")]


def test_count_questions_answer_every_count_and_keep_all_counts_of_two_or_more(tmp_path):
    manifests = write_dataset(tmp_path, 300, seed=2, resolution=32, splits={"train": 1.0})
    path = write_count_questions(tmp_path / "train", seed=5)
    assert path.read_bytes() == write_count_questions(tmp_path / "train", seed=5).read_bytes()
    scenes = {json.loads(line)["image"]: Scene.from_json(json.loads(line)).objects for line in manifests["train"]["scenes"].read_text().splitlines()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped record warns
        records = list(read_records(path, Counter()))
    assert [r.data["images"][0] for r in records] == list(scenes)
    answers = Counter()
    for record in records:
        objects = scenes[record.data["images"][0]]
        turns = record.data["conversation"]
        assert turns[0]["content"].startswith(f"{IMAGE_TOKEN}\n") and sum(t["content"].count(IMAGE_TOKEN) for t in turns) == 1
        asked = {}
        for question, answer in zip(turns[::2], turns[1::2]):
            what = re.fullmatch(r"How many (\w+)(?: objects)? are there\?", question["content"].removeprefix(f"{IMAGE_TOKEN}\n")).group(1)
            truth = sum(what in ("objects", o.colour, plural(o.shape)) for o in objects)
            assert answer["content"] == COUNT_WORDS[truth]
            asked[what] = truth
        assert asked["objects"] == len(objects)
        # every shape and colour that two objects or more share is asked about
        shared = {w for w, n in Counter([plural(o.shape) for o in objects] + [o.colour for o in objects]).items() if n >= 2}
        assert shared <= set(asked)
        answers.update(min(n, 2) for w, n in asked.items() if w != "objects")
    assert answers[0] and answers[1] and answers[2] > 0.2 * sum(answers.values())  # every shape and colour present asked, and one absent of each: about 0.12
    assert path.read_bytes() != write_count_questions(tmp_path / "train", seed=6).read_bytes()
