"""The shapes detector and evaluation: accuracy on ground truth, rejection of wrong images, the metrics'
plumbing (a perfect stand-in model scores 1.0), and `janus eval shapes` on a tiny random checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from itertools import permutations
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import janus
from janus.cli import main
from janus.data.shapes import (
    COLOURS,
    GRID,
    HELDOUT_PAIRS,
    SHAPES,
    SIZES,
    Description,
    ObjectSpec,
    Scene,
    SceneObject,
    failed_clauses,
    relation,
    relation_is_clear,
    render,
    sample_scene,
    scene_for,
    scene_rng,
)
from janus.eval.detector import detect
from janus.eval.shapes_eval import (
    GEN_CATEGORIES,
    VQA_TYPES,
    category_prompts,
    evaluate_generation,
    evaluate_understanding,
    format_report,
    heldout_prompts,
    normalise_answer,
    pope_metrics,
    text_perplexity,
    understanding_items,
)
from janus.testing import save_tiny_checkpoint

SCENES = [sample_scene(scene_rng(11, "detector", i)) for i in range(500)]


def _found_exactly(scene: Scene, found, resolution: int) -> bool:
    """Same objects: colour, shape and size equal, centres within a pixel."""
    if len(found) != len(scene.objects):
        return False
    close = 1.01 / resolution

    def same(o, d) -> bool:
        return (o.colour, o.shape, o.size) == (d.colour, d.shape, d.size) and abs(o.x - d.x) <= close and abs(o.y - d.y) <= close

    return any(all(same(o, d) for o, d in zip(scene.objects, order)) for order in permutations(found))


@pytest.mark.parametrize("resolution", [384, 64, 32])
def test_detector_finds_ground_truth(resolution):
    correct = sum(_found_exactly(s, detect(render(s, resolution)), resolution) for s in SCENES)
    assert correct / len(SCENES) >= 0.99


def _full_description(scene: Scene) -> Description:
    """Every attribute of every object, and the relation of a two-object scene."""
    objects = scene.objects
    clear_pair = len(objects) == 2 and relation_is_clear(*objects)
    specs = tuple(ObjectSpec(o.shape, o.colour, o.size) for o in objects)
    return Description("full", specs, relation(*objects) if clear_pair else None)


def _with_extra_object(scene: Scene, rng: random.Random) -> Scene | None:
    """The scene plus one small object where it fits, or None when nothing fits."""
    side = round(SIZES["small"] * GRID)
    spots = [(left, top) for left in range(1, GRID - side) for top in range(1, GRID - side)]
    rng.shuffle(spots)
    for left, top in spots:
        x, y = (left + side / 2) / GRID, (top + side / 2) / GRID
        if all(max(abs(x - o.x), abs(y - o.y)) - (o.side + side / GRID) / 2 >= 2 / GRID for o in scene.objects):
            return Scene(scene.objects + (SceneObject(rng.choice(SHAPES), rng.choice(COLOURS), "small", x, y),))
    return None


def _corruptions(scene: Scene, rng: random.Random) -> dict[str, Scene]:
    first = scene.objects[0]
    wrong = {
        "colour": dataclasses.replace(first, colour=rng.choice([c for c in COLOURS if c != first.colour])),
        "shape": dataclasses.replace(first, shape=rng.choice([s for s in SHAPES if s != first.shape])),
    }
    out = {name: Scene((obj,) + scene.objects[1:]) for name, obj in wrong.items()}
    out["missing"] = Scene(scene.objects[1:])
    extra = _with_extra_object(scene, rng)
    if extra is not None:
        out["extra"] = extra
    if _full_description(scene).relation is not None and len(set(_full_description(scene).objects)) == 2:
        a, b = scene.objects  # two different objects: swapped, the relation no longer holds
        out["swapped"] = Scene((dataclasses.replace(a, x=b.x, y=b.y), dataclasses.replace(b, x=a.x, y=a.y)))
    return out


def test_detector_rejects_wrong_images():
    rng = random.Random(0)
    rejected = {}
    for scene in SCENES[:150]:
        description = _full_description(scene)
        assert failed_clauses(description, detect(render(scene, 64))) == []
        for name, wrong in _corruptions(scene, rng).items():
            rejected.setdefault(name, []).append(bool(failed_clauses(description, detect(render(wrong, 64)))))
    assert set(rejected) == {"colour", "shape", "missing", "extra", "swapped"}
    assert all(all(flags) for flags in rejected.values()), {k: sum(v) / len(v) for k, v in rejected.items()}
    noise_rng = np.random.default_rng(0)
    for size in (64, 384):
        noise = Image.fromarray(noise_rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        assert detect(noise) == []
        assert failed_clauses(Description("colors", (ObjectSpec("circle", "red"),)), detect(noise))
    assert detect(Image.new("RGB", (64, 64), (127, 127, 127))) == []


def test_prompts():
    pairs = {frozenset(p) for p in HELDOUT_PAIRS}
    for category in ("position", "color_attr"):
        for prompt in category_prompts(category):
            assert frozenset((s.colour, s.shape) for s in prompt.objects) in pairs
    assert category_prompts("position")[0].text().count(" a ") == 1  # "a red circle left of a blue star"
    assert heldout_prompts("counting", 3, seed=1) == heldout_prompts("counting", 3, seed=1)
    assert heldout_prompts("counting", 3, seed=1) != heldout_prompts("counting", 3, seed=2)
    assert len(heldout_prompts("single_object", 12)) == 12  # five prompts, repeated
    assert [d.text() for d in category_prompts("counting")[:2]] == ["two red circles", "two red squares"]


def test_normalise_answer():
    assert normalise_answer("Red.") == normalise_answer("red") == "red"
    assert normalise_answer("Three!") == normalise_answer("3") == "3"
    assert normalise_answer("  The  top left ") == "top left"
    assert normalise_answer("a circle") == "circle"


def test_pope_metrics():
    rows = [(True, "Yes."), (True, "yes"), (False, "yes"), (False, "No"), (True, "no"), (False, "maybe")]
    m = pope_metrics(rows)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 6)
    always_yes = pope_metrics([(True, "yes"), (False, "yes")])
    assert always_yes["accuracy"] == 0.5 and always_yes["yes_ratio"] == 1.0 and always_yes["f1"] == pytest.approx(2 / 3)


class PerfectModel:
    """A stand-in for janus.Janus that draws what each prompt says and answers every question right."""

    def __init__(self, per_type: int):
        self.cfg = SimpleNamespace(vision=SimpleNamespace(image_size=64))
        self.prompts = {d.text(): d for category in GEN_CATEGORIES for d in category_prompts(category)}
        self.answers = {(qa.question, render(scene, 64).tobytes()): qa.answer for scene, qa, _ in understanding_items(per_type)}

    def generate_image(self, prompts, n, cfg_weight, temperature, seed, candidates, rank_by):
        rng = random.Random(seed)
        return [render(scene_for(self.prompts[p], rng), 64) for p in prompts for _ in range(n)]

    def chat(self, question, images, temperature, max_new_tokens):
        return self.answers[question, images[0].tobytes()].capitalize() + "."


def test_perfect_model_scores_one():
    model = PerfectModel(per_type=6)
    generation = evaluate_generation(model, per_category=6, k=2)
    assert generation["overall"] == 1.0 and generation["overall_stderr"] == 0.0
    assert all(c["accuracy"] == 1.0 and c["images"] == 12 for c in generation["categories"].values())
    understanding = evaluate_understanding(model, per_type=6)
    assert understanding["vqa_overall"] == 1.0 and understanding["vqa_overall_stderr"] == 0.0
    assert all(v["questions"] == 6 for v in understanding["vqa"].values())
    for p in understanding["pope"].values():
        assert p["accuracy"] == 1.0 and p["f1"] == 1.0 and p["yes_ratio"] == 0.5


class MiscountingModel(PerfectModel):
    """Answers every other count question "seven"; everything else right."""

    def __init__(self, per_type: int):
        super().__init__(per_type)
        self.count_questions = 0

    def chat(self, question, images, temperature, max_new_tokens):
        if question.startswith("How many"):
            self.count_questions += 1
            if self.count_questions % 2:
                return "seven"
        return super().chat(question, images, temperature, max_new_tokens)


def test_vqa_standard_error_is_binomial_per_type_and_averaged_over_types():
    understanding = evaluate_understanding(MiscountingModel(per_type=8), per_type=8)
    assert understanding["vqa"]["count"]["accuracy"] == 0.5
    assert understanding["vqa"]["count"]["stderr"] == pytest.approx(math.sqrt(0.25 / 8))
    assert all(v["stderr"] == 0.0 for t, v in understanding["vqa"].items() if t != "count")
    assert understanding["vqa_overall_stderr"] == pytest.approx(math.sqrt(0.25 / 8) / len(VQA_TYPES))


class SideBySideSwappedModel(PerfectModel):
    """Draws "X left of Y" as X right of Y (and the reverse); everything else as the prompt says."""

    SWAPPED = {"left of": "right of", "right of": "left of"}

    def generate_image(self, prompts, n, cfg_weight, temperature, seed, candidates, rank_by):
        rng = random.Random(seed)
        wanted = [self.prompts[p] for p in prompts]
        drawn = [dataclasses.replace(d, relation=self.SWAPPED.get(d.relation, d.relation)) for d in wanted]
        return [render(scene_for(d, rng), 64) for d in drawn for _ in range(n)]


def test_position_accuracy_is_reported_by_axis():
    categories = evaluate_generation(SideBySideSwappedModel(per_type=1), per_category=20, k=2)["categories"]
    position = categories["position"]
    by_axis = position["by_axis"]
    assert set(by_axis) == {"above/below", "left/right"} and [c for c in categories if "by_axis" in categories[c]] == ["position"]
    assert by_axis["above/below"]["accuracy"] == 1.0 and by_axis["left/right"]["accuracy"] == 0.0
    assert by_axis["above/below"]["images"] + by_axis["left/right"]["images"] == position["images"] == 40
    assert position["correct"] == by_axis["above/below"]["correct"] > 0
    report = format_report({"settings": {"per_category": 20, "k": 2}, "generation": {"overall": 0.0, "overall_stderr": 0.0, "categories": categories},
                            "understanding": {"vqa": {}, "vqa_overall": 0.0, "vqa_overall_stderr": 0.0, "pope": {}},
                            "text": {kind: {"perplexity": 1.0, "nll_per_token": 0.0, "documents": 0} for kind in ("captions", "scene_texts")}})
    assert f"left/right    0.000  (0/{by_axis['left/right']['images']})" in report
    # Each prompt's images are all right (above/below) or all wrong (left/right): with a fraction f of
    # the n prompts right, the spread between prompts gives the standard error sqrt(f (1 - f) / (n - 1)).
    f = by_axis["above/below"]["images"] / position["images"]
    assert position["stderr"] == pytest.approx(math.sqrt(f * (1 - f) / 19))
    assert categories["single_object"]["stderr"] == 0.0


def test_text_perplexity_is_the_vocabulary_size_for_uniform_logits_and_one_for_certain_ones(tmp_path, monkeypatch):
    model = janus.load(save_tiny_checkpoint(tmp_path / "tiny"), device="cpu")
    documents = ["a red circle above a blue square", "There are two stars."]
    ids = [model.tokenizer.encode(d) + [model.tokenizer.eos_id] for d in documents]
    vocab = model.model.decoder.lm_head.out_features
    monkeypatch.setattr(model.model, "text_logits", lambda hidden: torch.zeros(*hidden.shape[:-1], vocab))
    uniform = text_perplexity(model, documents)
    assert uniform["tokens"] == sum(len(i) - 1 for i in ids) and uniform["documents"] == 2
    assert uniform["perplexity"] == pytest.approx(vocab, rel=1e-5)
    targets = iter(torch.tensor(i[1:]) for i in ids)  # each document's next tokens, in order
    monkeypatch.setattr(model.model, "text_logits", lambda hidden: 50.0 * F.one_hot(next(targets), vocab).float())
    assert text_perplexity(model, documents)["perplexity"] == pytest.approx(1.0, abs=1e-6)


def _in_unit_range(value) -> bool:
    return isinstance(value, float | int) and 0.0 <= value <= 1.0


def test_eval_shapes_command_on_tiny_random_model(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "results" / "shapes.json"
    args = ["eval", "shapes", "--model", str(ckpt), "--json", str(out), "--k", "2", "--per-category", "1", "--device", "cpu", "--cfg", "3", "--temperature", "0.5",
            "--candidates", "2", "--rank-by", "questions"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "POPE" in printed and "perplexity" in printed
    results = json.loads(out.read_text())
    assert results["settings"] == {"seed": 1000, "k": 2, "per_category": 1, "cfg_weight": 3.0, "temperature": 0.5, "candidates": 2,
                                   "rank_by": "questions", "understanding_resolution": 32, "model": str(ckpt)}
    generation = results["generation"]
    assert set(generation["categories"]) == set(GEN_CATEGORIES) and _in_unit_range(generation["overall"])
    for c in generation["categories"].values():
        assert _in_unit_range(c["accuracy"]) and c["images"] == 2 and len(c["prompts"]) == 1
    understanding = results["understanding"]
    assert set(understanding["vqa"]) == set(VQA_TYPES) and _in_unit_range(understanding["vqa_overall"])
    assert all(_in_unit_range(v["accuracy"]) and v["questions"] == 1 for v in understanding["vqa"].values())
    assert set(understanding["pope"]) == {"random", "adversarial", "binding", "all"}
    for p in understanding["pope"].values():
        assert all(_in_unit_range(p[key]) for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
    assert set(results["text"]) == {"captions", "scene_texts"}
    for text in results["text"].values():
        assert math.isfinite(text["perplexity"]) and text["perplexity"] >= 1.0 and text["nll_per_token"] >= 0
        assert text["documents"] == 6 and text["tokens"] > 6
