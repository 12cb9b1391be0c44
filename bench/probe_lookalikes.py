"""Does the model find the object a question names when another object looks like it?

Position and relation questions name objects by colour and shape ("Where is the white square in the
image?"). On held-out scenes, each question is put in a group by the other objects: for position, whether
another object has the named one's shape (in another colour), its colour (in another shape), both kinds,
or neither; for relation, whether the two named objects share their shape, their colour, or neither.
A model that finds objects by shape alone answers "same shape" questions about half right. For wrong
position answers the table also gives the fraction that name the region of another object in the scene:
the model read the wrong object.

    python bench/probe_lookalikes.py                       # the built-in default model
    python bench/probe_lookalikes.py --model PATH --per-group 100 --json bench/results/probe_lookalikes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import janus
from janus.data.shapes import (
    RELATION_ANSWERS, Scene, SceneObject, has_lookalike, named_objects, object_name, region, region_is_clear, relation, relation_is_clear, render, sample_scene,
    scene_rng, where_is, where_relative,
)
from janus.eval.shapes_eval import normalise_answer

SEED = 3_000  # no training split uses it
POSITION_GROUPS = ("same shape", "same colour", "both", "neither")
RELATION_GROUPS = ("same shape", "same colour", "neither")
MAX_SCENES = 100_000  # far more than any group needs; stops a search that cannot fill a group


def position_group(scene: Scene, obj: SceneObject) -> str:
    shape = has_lookalike(obj.colour, obj.shape, scene.objects)
    colour = any(o.colour == obj.colour and o.shape != obj.shape for o in scene.objects)
    return {(True, False): "same shape", (False, True): "same colour", (True, True): "both"}.get((shape, colour), "neither")


def relation_group(a: SceneObject, b: SceneObject) -> str:
    return "same shape" if a.shape == b.shape else "same colour" if a.colour == b.colour else "neither"


def questions(per_group: int) -> list[tuple[Scene, str, str, str, str]]:
    """(scene, type, group, question, answer), per_group of each group, at most one per scene and type."""
    wanted = {("position", g): per_group for g in POSITION_GROUPS} | {("relation", g): per_group for g in RELATION_GROUPS}
    items = []
    for index in range(MAX_SCENES):
        if not any(wanted.values()):
            return items
        rng = scene_rng(SEED, "lookalikes", index)
        scene = sample_scene(rng)
        named = named_objects(scene)
        positions = [o for o in named if region_is_clear(o) and wanted["position", position_group(scene, o)]]
        if positions:
            obj = rng.choice(positions)
            wanted["position", position_group(scene, obj)] -= 1
            items.append((scene, "position", position_group(scene, obj), where_is(object_name(obj)), region(obj)))
        pairs = [(a, b) for a in named for b in named if a is not b and relation_is_clear(a, b) and wanted["relation", relation_group(a, b)]]
        if pairs:
            a, b = rng.choice(pairs)
            wanted["relation", relation_group(a, b)] -= 1
            items.append((scene, "relation", relation_group(a, b), where_relative(object_name(a), object_name(b)), RELATION_ANSWERS[relation(a, b)]))
    raise RuntimeError(f"{MAX_SCENES} scenes did not fill every group: {wanted}")


def probe(model: janus.Janus, per_group: int) -> dict[str, dict[str, dict[str, float]]]:
    """Type -> group -> questions, accuracy, and (position) wrong answers naming another object's region."""
    tallies: dict[str, dict[str, dict[str, float]]] = {}
    for scene, kind, group, question, expected in questions(per_group):
        image = render(scene, model.cfg.vision.image_size)
        answer = normalise_answer(model.chat(question, images=[image], temperature=0.0, max_new_tokens=8))
        row = tallies.setdefault(kind, {}).setdefault(group, {"questions": 0, "right": 0, "wrong": 0, "another_object": 0})
        row["questions"] += 1
        if answer == normalise_answer(expected):
            row["right"] += 1
        else:
            row["wrong"] += 1
            row["another_object"] += kind == "position" and answer in {normalise_answer(region(o)) for o in scene.objects}
    return {
        kind: {group: {"questions": r["questions"], "accuracy": r["right"] / r["questions"],
                       "wrong_naming_another_object": r["another_object"] / r["wrong"] if r["wrong"] else 0.0}
               for group, r in groups.items()}
        for kind, groups in tallies.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--per-group", type=int, default=100, help="questions per group (default 100)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.per_group < 1:
        parser.error(f"--per-group must be at least 1, got {args.per_group}")
    model = janus.load(args.model, device="cpu", dtype="float32")
    results = probe(model, args.per_group)
    print(f"{args.model or 'built-in'}: {args.per_group} questions per group, scenes of seed {SEED}")
    print(f"  {'question':<10}{'other objects':<14}{'accuracy':>10}{'wrong: another object':>23}")
    for kind, groups in results.items():
        for group, row in groups.items():
            other = f"{row['wrong_naming_another_object']:23.2f}" if kind == "position" else ""
            print(f"  {kind:<10}{group:<14}{row['accuracy']:10.3f}{other}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model or "built-in", "per_group": args.per_group, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
