"""Does the model bind colour to shape when it answers? Both directions, on two-object scenes.

For held-out scenes of two objects with different colours and different shapes, the model is asked,
one question per chat as the evaluation asks, the shape of each colour ("What shape is the red
object?") and the colour of each shape ("What colour is the circle?"). A model that binds answers
both questions of a scene right; one that reads a single object's attribute for the whole scene gives
the same answer to both and is right about half the time. The table gives, per direction, the accuracy,
the fraction of scenes with both answers right, and the fraction with the same answer to both.

    python bench/probe_binding.py                       # the built-in default model
    python bench/probe_binding.py --model PATH --scenes 200 --json bench/results/probe_binding.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import janus
from janus.data.shapes import Scene, render, sample_scene, scene_rng, what_colour, what_shape

SEED = 3_000  # no training split uses it


def two_object_scenes(n: int) -> list[Scene]:
    """The first n scenes of the seed's stream with two objects differing in colour and in shape."""
    scenes, index = [], 0
    while len(scenes) < n:
        scene = sample_scene(scene_rng(SEED, "binding", index))
        index += 1
        if len(scene.objects) == 2 and len({o.colour for o in scene.objects}) == 2 and len({o.shape for o in scene.objects}) == 2:
            scenes.append(scene)
    return scenes


DIRECTIONS = {  # question about an object, and its expected answer
    "shape of colour": (lambda o: what_shape(o.colour, 1), lambda o: o.shape),
    "colour of shape": (lambda o: what_colour(o.shape, 1), lambda o: o.colour),
}


def probe(model: janus.Janus, scenes: list[Scene]) -> dict[str, dict[str, float]]:
    """Direction -> accuracy, both answers of a scene right, and the same answer to both questions."""
    tallies = {name: {"accuracy": 0.0, "both_right": 0.0, "same_answer": 0.0} for name in DIRECTIONS}
    for scene in scenes:
        image = render(scene, model.cfg.vision.image_size)
        for name, (ask, expected) in DIRECTIONS.items():
            answers = [model.chat(ask(o), images=[image], temperature=0.0, max_new_tokens=4).strip() for o in scene.objects]
            right = [a == expected(o) for a, o in zip(answers, scene.objects)]
            tallies[name]["accuracy"] += sum(right) / 2
            tallies[name]["both_right"] += all(right)
            tallies[name]["same_answer"] += answers[0] == answers[1]
    return {name: {k: v / len(scenes) for k, v in row.items()} for name, row in tallies.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--scenes", type=int, default=200, help="two-object scenes (default 200)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    model = janus.load(args.model, device="cpu", dtype="float32")
    results = probe(model, two_object_scenes(args.scenes))
    print(f"{args.model or 'built-in'}: {args.scenes} two-object scenes")
    print(f"  {'question':<18}{'accuracy':>10}{'both right':>12}{'same answer':>13}")
    for name, row in results.items():
        print(f"  {name:<18}{row['accuracy']:10.3f}{row['both_right']:12.3f}{row['same_answer']:13.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model or "built-in", "scenes": args.scenes, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
