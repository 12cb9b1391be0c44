"""Exact offline evaluation on the shapes world (docs/shapes.md).

- generation, GenEval-style: held-out prompts per category, K images each, every image checked by
  the detector; an image counts only if every clause of its prompt holds.
- understanding: exact-match VQA accuracy per question type, and POPE-style yes/no questions per
  negative kind (accuracy, F1, yes-ratio), on held-out scenes.
- text: perplexity of held-out captions and of held-out scene descriptions under the text head.

Seeds: every scene and prompt here comes from an "eval-..." stream of `scene_rng`, which
`write_dataset` never uses (its streams are split names), so the evaluation never sees a training
scene whatever the seed; the position and color_attr prompts use only HELDOUT_PAIRS compositions,
which no training split contains.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections import Counter

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from janus.data.shapes import (
    COUNT_WORDS,
    DESCRIPTORS,
    HELDOUT_PAIRS,
    NEGATIVE_KINDS,
    RELATIONS,
    SHAPES,
    QA,
    Description,
    ObjectSpec,
    Scene,
    caption,
    failed_clauses,
    question,
    render,
    sample_scene,
    scene_rng,
    scene_text,
)
from janus.eval.clause_judge import ranking
from janus.eval.detector import detect
from janus.pipeline import Janus

GEN_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
VQA_TYPES = ("colour", "shape", "count", "position", "relation", "size")
EVAL_SEED = 1000
# In raster order, objects side by side are drawn in turns, row by row, and stacked ones one after the
# other; models find the first much harder (docs/default_model.md, "Side by side"), so position
# accuracy is also reported per axis.
RELATION_AXES = {"left of": "left/right", "right of": "left/right", "above": "above/below", "below": "above/below"}
MAX_ANSWER_TOKENS = 8  # every answer is one or two words


# ---------------------------------------------------------------- prompts


def category_prompts(category: str) -> list[Description]:
    """Every prompt of a category, in a fixed order."""
    if category == "single_object":
        return [Description(category, (ObjectSpec(s),)) for s in SHAPES]
    if category == "two_object":
        return [Description(category, (ObjectSpec(a), ObjectSpec(b))) for a in SHAPES for b in SHAPES if a != b]
    if category == "counting":
        return [Description(category, (ObjectSpec(s, c),) * n) for n in (2, 3, 4) for c, s in DESCRIPTORS]
    if category == "colors":
        return [Description(category, (ObjectSpec(s, c),)) for c, s in DESCRIPTORS]
    pairs = [(a, b) for pair in HELDOUT_PAIRS for a, b in (pair, pair[::-1])]
    if category == "position":
        return [Description(category, (ObjectSpec(a[1], a[0]), ObjectSpec(b[1], b[0])), r) for a, b in pairs for r in RELATIONS]
    if category == "color_attr":
        return [Description(category, (ObjectSpec(a[1], a[0]), ObjectSpec(b[1], b[0]))) for a, b in pairs if a[0] != b[0] and a[1] != b[1]]
    raise ValueError(f"unknown category {category!r}; expected one of {GEN_CATEGORIES}")


def heldout_prompts(category: str, n: int, seed: int = EVAL_SEED) -> list[Description]:
    """n prompts of a category in a seeded order; a category with fewer than n prompts repeats them."""
    prompts = category_prompts(category)
    random.Random(f"janus-shapes:{seed}:eval-prompts:{category}").shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]


# ---------------------------------------------------------------- generation


def _tally(correct: int, images: int) -> dict:
    return {"accuracy": correct / images, "correct": correct, "images": images}


def _mean_stderr(stderrs: list[float]) -> float:
    """Standard error of the mean of independent estimates with these standard errors."""
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def _prompt_stderr(per_prompt: list[dict]) -> float:
    """Standard error of a category's accuracy over its prompts: images of one prompt are not
    independent, so the spread is taken between prompts' accuracies (0 for a single prompt)."""
    rates = [p["correct"] / p["images"] for p in per_prompt]
    return statistics.stdev(rates) / math.sqrt(len(rates)) if len(rates) > 1 else 0.0


def evaluate_generation(
    model: Janus, per_category: int, k: int, seed: int = EVAL_SEED, cfg_weight: float | None = None, temperature: float | None = None,
    candidates: int = 1, rank_by: str = "likelihood",
) -> dict:
    """GenEval-style accuracy: per category, the fraction of images whose every prompt clause holds
    (`candidates`: as `Janus.generate_image_tokens`; `rank_by`: one of `clause_judge.RANK_CHOICES`)."""
    categories = {}
    for index, category in enumerate(GEN_CATEGORIES):
        prompts = heldout_prompts(category, per_category, seed)
        images = model.generate_image(
            [p.text() for p in prompts], n=k, cfg_weight=cfg_weight, temperature=temperature, seed=seed + index, candidates=candidates,
            rank_by=ranking(model, rank_by),
        )
        failures: Counter = Counter()
        per_prompt = []
        by_axis: dict[str, Counter] = {}
        for i, prompt in enumerate(prompts):
            correct = 0
            for image in images[i * k : (i + 1) * k]:
                failed = failed_clauses(prompt, detect(image))
                correct += not failed
                failures.update({clause.split(":")[0] for clause in failed})
            per_prompt.append({"prompt": prompt.text(), "correct": correct, "images": k})
            if prompt.relation is not None:
                by_axis.setdefault(RELATION_AXES[prompt.relation], Counter()).update(correct=correct, images=k)
        categories[category] = {
            **_tally(sum(p["correct"] for p in per_prompt), k * len(prompts)),
            "stderr": _prompt_stderr(per_prompt),
            "failed_clauses": dict(sorted(failures.items())),  # images failing each kind of clause
            "prompts": per_prompt,
        }
        if by_axis:
            categories[category]["by_axis"] = {axis: _tally(c["correct"], c["images"]) for axis, c in sorted(by_axis.items())}
    overall = sum(c["accuracy"] for c in categories.values()) / len(categories)  # GenEval: mean over categories
    return {"overall": overall, "overall_stderr": _mean_stderr([c["stderr"] for c in categories.values()]), "categories": categories}


# ---------------------------------------------------------------- understanding

_ARTICLES = {"a", "an", "the"}
_DIGITS = {word: str(i) for i, word in enumerate(COUNT_WORDS)}


def normalise_answer(text: str) -> str:
    """Lower-case, punctuation removed, articles dropped, numbers as digits, single spaces."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_DIGITS.get(w, w) for w in words if w not in _ARTICLES)


def understanding_items(per_type: int, seed: int = EVAL_SEED) -> list[tuple[Scene, QA, str]]:
    """(scene, question, group) triples. Groups: every VQA type with per_type questions, and every
    POPE negative kind with per_type existence questions answered "yes" and per_type answered "no".
    A scene gives at most one question per group and answer."""
    wanted = Counter({(t, None): per_type for t in VQA_TYPES})
    wanted.update({(kind, yes): per_type for kind in NEGATIVE_KINDS for yes in (True, False)})
    items = []
    index = 0
    while +wanted:
        rng = scene_rng(seed, "eval-scenes", index)
        scene = sample_scene(rng)
        index += 1
        for group, yes in list(+wanted):
            if yes is None:
                qa = question(scene, group, rng)
            else:
                qa = question(scene, "existence", rng, answer_yes=yes, negative=group)
            if qa is not None:
                items.append((scene, qa, group))
                wanted[group, yes] -= 1
    return items


def evaluate_understanding(model: Janus, per_type: int, seed: int = EVAL_SEED, progress: bool = False) -> dict:
    """Exact-match VQA accuracy per question type; POPE accuracy, precision, recall, F1, yes-ratio."""
    resolution = model.cfg.vision.image_size
    vqa: dict[str, list[dict]] = {t: [] for t in VQA_TYPES}
    pope: dict[str, list[tuple[bool, str]]] = {k: [] for k in NEGATIVE_KINDS}
    images: dict[Scene, Image.Image] = {}
    for scene, qa, group in tqdm(understanding_items(per_type, seed), desc="questions", disable=not progress):
        if scene not in images:
            images[scene] = render(scene, resolution)
        answer = model.chat(qa.question, images=[images[scene]], temperature=0.0, max_new_tokens=MAX_ANSWER_TOKENS)
        if qa.type == "existence":
            pope[group].append((qa.answer == "yes", answer))
        else:
            vqa[group].append({"question": qa.question, "expected": qa.answer, "answer": answer})
    per_type_results = {}
    for kind, rows in vqa.items():
        correct = sum(normalise_answer(r["answer"]) == normalise_answer(r["expected"]) for r in rows)
        accuracy = correct / len(rows)
        per_type_results[kind] = {"accuracy": accuracy, "stderr": math.sqrt(accuracy * (1 - accuracy) / len(rows)), "questions": len(rows), "examples": rows[:3]}
    pope_results = {kind: pope_metrics(rows) for kind, rows in pope.items()}
    pope_results["all"] = pope_metrics([row for rows in pope.values() for row in rows])
    overall = sum(r["accuracy"] for r in per_type_results.values()) / len(per_type_results)
    stderr = _mean_stderr([r["stderr"] for r in per_type_results.values()])
    return {"vqa_overall": overall, "vqa_overall_stderr": stderr, "vqa": per_type_results, "pope": pope_results}


def pope_metrics(rows: list[tuple[bool, str]]) -> dict:
    """POPE numbers for (truth is yes, model answer) rows. An answer is "yes" or "no" by its first
    word; any other answer is wrong either way and is not a "yes"."""
    said = [normalise_answer(answer).split()[:1] for _, answer in rows]
    yes = [s == ["yes"] for s in said]
    no = [s == ["no"] for s in said]
    tp = sum(y and truth for y, (truth, _) in zip(yes, rows))
    fp = sum(y and not truth for y, (truth, _) in zip(yes, rows))
    tn = sum(n and not truth for n, (truth, _) in zip(no, rows))
    positives = sum(truth for truth, _ in rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else 0.0
    return {
        "accuracy": (tp + tn) / len(rows),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(yes) / len(rows),
        "questions": len(rows),
    }


# ---------------------------------------------------------------- text


@torch.no_grad()
def text_perplexity(model: Janus, documents: list[str]) -> dict:
    """Perplexity of `documents` as text: mean next-token NLL over every token after BOS, the closing
    EOS included (what text training computes its loss on)."""
    total, tokens = 0.0, 0
    for document in documents:
        ids = torch.tensor([model.tokenizer.encode(document) + [model.tokenizer.eos_id]], device=model.device)
        logits = model.model.text_logits(model.model(ids)[0, :-1]).float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
    nll = total / tokens
    return {"perplexity": math.exp(nll) if nll < 700 else math.inf, "nll_per_token": nll, "tokens": tokens, "documents": len(documents)}


def evaluate_text(model: Janus, n_documents: int, seed: int = EVAL_SEED) -> dict:
    """Perplexity of held-out captions (text the model only ever reads in prompts, never writes) and of
    held-out scene descriptions (the kind of text its text data holds), each n_documents."""
    captions, descriptions = [], []
    for index in range(n_documents):
        rng = scene_rng(seed, "eval-captions", index)
        captions.append(caption(sample_scene(rng), rng).text(rng))
        rng = scene_rng(seed, "eval-texts", index)
        descriptions.append(scene_text(sample_scene(rng), rng))
    return {"captions": text_perplexity(model, captions), "scene_texts": text_perplexity(model, descriptions)}


# ---------------------------------------------------------------- all together


def evaluate(
    model: Janus,
    per_category: int = 50,
    k: int = 4,
    seed: int = EVAL_SEED,
    progress: bool = False,
    cfg_weight: float | None = None,
    temperature: float | None = None,
    candidates: int = 1,
    rank_by: str = "likelihood",
) -> dict:
    """Every shapes metric of a loaded `janus.Janus` model; `cfg_weight` and `temperature` (of image
    generation) None are the model's defaults; `candidates` as `Janus.generate_image_tokens`, `rank_by` one of
    `clause_judge.RANK_CHOICES` ("questions": `clause_judge`).

    per_category: prompts per generation category, questions per VQA type, and yes and no questions
    per POPE negative kind; the text metrics use per_category * 6 captions and as many scene descriptions.
    """
    if per_category < 1 or k < 1:
        raise ValueError(f"per_category and k must be >= 1, got {per_category} and {k}")
    model.model.eval()
    cfg_weight, temperature = model.image_settings(cfg_weight, temperature)
    settings = {"seed": seed, "k": k, "per_category": per_category, "cfg_weight": cfg_weight, "temperature": temperature, "candidates": candidates}
    if candidates > 1:
        settings["rank_by"] = rank_by
    return {
        "settings": {**settings, "understanding_resolution": model.cfg.vision.image_size},
        "generation": evaluate_generation(model, per_category, k, seed, cfg_weight, temperature, candidates, rank_by),
        "understanding": evaluate_understanding(model, per_category, seed, progress),
        "text": evaluate_text(model, per_category * len(GEN_CATEGORIES), seed),
    }


def format_report(results: dict) -> str:
    """The results as a plain-text table."""
    settings, gen, und, text = results["settings"], results["generation"], results["understanding"], results["text"]
    lines = [f"generation (GenEval-style; {settings['per_category']} prompts x {settings['k']} images per category)"]
    for name, c in gen["categories"].items():
        lines.append(f"  {name:<14} {c['accuracy']:6.3f}  ({c['correct']}/{c['images']})")
        lines += [f"    {axis:<12} {a['accuracy']:6.3f}  ({a['correct']}/{a['images']})" for axis, a in c.get("by_axis", {}).items()]
    lines += [f"  {'overall':<14} {gen['overall']:6.3f}  (standard error {gen['overall_stderr']:.3f})", "", "understanding (exact match)"]
    for name, v in und["vqa"].items():
        lines.append(f"  {name:<14} {v['accuracy']:6.3f}  ({v['questions']} questions)")
    lines += [f"  {'overall':<14} {und['vqa_overall']:6.3f}  (standard error {und['vqa_overall_stderr']:.3f})", "", f"  {'POPE':<14} {'acc':>6} {'f1':>6} {'yes':>6}"]
    for name, p in und["pope"].items():
        lines.append(f"  {name:<14} {p['accuracy']:6.3f} {p['f1']:6.3f} {p['yes_ratio']:6.3f}")
    lines.append("")
    for name, label in (("captions", "captions"), ("scene_texts", "scene descriptions")):
        p = text[name]
        lines.append(f"text: perplexity of {p['documents']} held-out {label} {p['perplexity']:.3f} ({p['nll_per_token']:.3f} nats/token)")
    return "\n".join(lines)
