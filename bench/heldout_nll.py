"""How well does a model predict held-out images from their captions, and does half precision hurt?

For fresh shapes scenes (a seed no training split uses), each scene's image is encoded to VQ codes
and its caption to a generation prompt; one teacher-forced forward pass per scene gives the mean
negative log-likelihood per code under the conditional logits. It is a finer measure than
`janus eval shapes`'s accuracies, whose sampling noise hides small changes. Each model is scored with
its float32 weights and with them rounded to bfloat16 and to float16 (computed in float32), which is
what storing the checkpoint in half precision costs.

    python bench/heldout_nll.py                                  # the built-in default model
    python bench/heldout_nll.py --models A B --scenes 400 --json bench/results/heldout_nll.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import janus
from janus.data.codes import encode_images
from janus.data.shapes import caption, render, sample_scene

SEED = 8_000  # no training split uses it
ROUNDINGS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def code_nll(model: janus.Janus, prompts: list[str], codes: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats) of each scene's codes given its prompt."""
    model.model.eval()
    return -sum(float(model.image_loglik(prompt, row[None])) for prompt, row in zip(prompts, codes)) / codes.numel()


def score(path: str | None, n_scenes: int) -> dict[str, float]:
    model = janus.load(path, device="cpu", dtype="float32")
    rng = random.Random(SEED)
    scenes = [sample_scene(rng) for _ in range(n_scenes)]
    prompts = [caption(s, rng).text() for s in scenes]
    codes = encode_images(model.model.vq, [render(s, model.cfg.vq.image_size) for s in scenes])
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    results = {}
    for name, dtype in ROUNDINGS.items():
        rounded = {k: v.to(dtype).float() if dtype and v.is_floating_point() else v for k, v in weights.items()}
        model.model.load_state_dict(rounded)
        results[name] = round(code_nll(model, prompts, codes), 5)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[None], help="checkpoint directories (default: the built-in model)")
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.scenes < 1:
        raise SystemExit("--scenes must be positive")
    print(f"{'model':<48} " + " ".join(f"{name:>9}" for name in ROUNDINGS) + "   (nats per code)")
    results = {}
    for path in args.models:
        name = path or "built-in"
        results[name] = score(path, args.scenes)
        print(f"{name:<48} " + " ".join(f"{results[name][r]:>9.4f}" for r in ROUNDINGS))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"scenes": args.scenes, "seed": SEED, "nll": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
