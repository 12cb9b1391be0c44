"""Does a model know where each image token sits in the grid? Linear probes of row and column.

For held-out shapes scenes, every image token's features are taken from the understanding encoder,
from the understanding adaptor (the decoder's input), and from each decoder layer, on both visual
paths: the understanding prompt of a question, and the generation prompt of the scene's caption
followed by its VQ codes. A least-squares linear probe is fitted to predict the token's grid row and
column from them on the first scenes and scored on the rest (chance: 1 / grid side).

    python bench/probe_positions.py                     # the built-in default model
    python bench/probe_positions.py --model PATH --scenes 400 --json bench/results/probe.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from torch import Tensor

import janus
from janus.data.codes import encode_images
from janus.data.shapes import caption, render, sample_scene
from janus.processing import DEFAULT_SYSTEM_PROMPT, expand_image_tokens, generation_prompt, preprocess_understanding, render_chat

SEED = 7_000  # no training split uses it


def probe_accuracy(features: Tensor, labels: Tensor, n_fit: int) -> float:
    """features [N, T, D] for N images of T tokens, labels [T]: accuracy on images n_fit.. of a linear
    least-squares probe fitted on the first n_fit."""
    n, t, d = features.shape
    x = features.reshape(n * t, d).double()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    x = torch.cat([x, torch.ones(n * t, 1, dtype=x.dtype)], 1)
    y = labels.repeat(n)
    fit = torch.arange(n * t) < n_fit * t
    weights = torch.linalg.lstsq(x[fit], torch.nn.functional.one_hot(y[fit]).double()).solution
    return float(((x[~fit] @ weights).argmax(1) == y[~fit]).double().mean())


@torch.no_grad()
def collect(model: janus.Janus, n_scenes: int) -> dict[str, Tensor]:
    """Features [n_scenes, tokens, D] at every image token, by where they were taken."""
    m, tok, cfg = model.model.eval(), model.tokenizer, model.cfg
    rng = random.Random(SEED)
    scenes = [sample_scene(rng) for _ in range(n_scenes)]
    pixels = preprocess_understanding([render(s, cfg.vision.image_size) for s in scenes], cfg.vision.image_size)
    codes = encode_images(m.vq, [render(s, cfg.vq.image_size) for s in scenes])
    taps: dict[int, Tensor] = {}
    hooks = [layer.register_forward_hook(lambda _m, _i, out, k=k: taps.__setitem__(k, out)) for k, layer in enumerate(m.decoder.layers)]
    out: dict[str, list[Tensor]] = {"encoder": [], "adaptor": []}
    try:
        question = render_chat([{"role": "user", "content": "<image_placeholder>\nWhere is it?"}, {"role": "assistant", "content": ""}], cfg.roles, DEFAULT_SYSTEM_PROMPT)
        ids = torch.tensor([[tok.bos_id] + expand_image_tokens(tok.encode(question, bos=False), tok, cfg.vision.num_patches)])
        image_mask = ids == tok.image_id
        for i, scene in enumerate(scenes):
            out["encoder"].append(m.vision.forward_features(pixels[i : i + 1])[0])
            out["adaptor"].append(m.encode_images(pixels[i : i + 1])[0])
            m(ids, image_mask=image_mask, pixels=pixels[i : i + 1])
            for k, h in taps.items():
                out.setdefault(f"understanding, layer {k}", []).append(h[0, image_mask[0]])
            prompt = tok.encode(generation_prompt(caption(scene, rng).text(), cfg.roles))
            tokens = torch.tensor([prompt + codes[i].tolist()])
            m(tokens, code_mask=torch.arange(tokens.shape[1])[None] >= len(prompt))
            for k, h in taps.items():  # the state at code k's input position predicts code k + 1: it is at cell k
                out.setdefault(f"generation, layer {k}", []).append(h[0, len(prompt) :])
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.stack(values).float() for name, values in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--scenes", type=int, default=400, help="held-out scenes; the last fifth score the probe")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = janus.load(args.model, device="cpu", dtype="float32")
    if model.cfg.vision.num_patches != model.cfg.vq.num_tokens:
        raise SystemExit("this probe needs the same grid on both visual paths")
    side = model.cfg.vq.grid_size
    cells = torch.arange(side * side)
    n_fit = args.scenes * 4 // 5
    results = {}
    print(f"{'features':<28} {'row':>6} {'column':>7}   (chance {1 / side:.3f})")
    for name, features in collect(model, args.scenes).items():
        row, column = probe_accuracy(features, cells // side, n_fit), probe_accuracy(features, cells % side, n_fit)
        results[name] = {"row": round(row, 3), "column": round(column, 3)}
        print(f"{name:<28} {row:>6.3f} {column:>7.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model or "built-in", "scenes": args.scenes, "probes": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
