"""Self-training data for image generation in the shapes world (docs/default_model.md, "Learning from
its own best pictures"): the model draws several candidates for training-distribution captions, its
own answers to each caption's clause questions pick the best (`janus.eval.clause_judge`), and the
picks become generation records. Training on them moves one sample towards what best of N gives,
in the manner of rejection-sampling fine-tuning. No detector and no other model is involved: the
evaluation's detector never sees these images.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.shapes import caption, sample_scene, scene_rng
from ..eval.clause_judge import clause_scores
from ..pipeline import Janus

CHUNK = 48  # captions per sampling call


def write_judged_generations(
    model: Janus, out_dir: str | Path, n_captions: int, seed: int, candidates: int = 4, raster: int | None = 8
) -> Path:
    """Write `out_dir/images/NNNNNN.png` and `out_dir/judged.jsonl`: for each of `n_captions` captions of
    new training scenes (no held-out pair; `raster` as `caption`'s), the best of `candidates` images by
    `clause_scores`, as a generation record with its score under "judge" (0: the model is sure every
    clause holds). Scenes come from their own seed stream, "self"; the same seed writes the same files.
    Returns the manifest."""
    if n_captions < 1 or candidates < 2:
        raise ValueError(f"n_captions must be >= 1 and candidates >= 2, got {n_captions} and {candidates}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    best: list[float] = []

    def judge(prompt, images):
        scores = clause_scores(model, prompt, images)
        best.append(float(scores.max()))  # the sampler judges prompts in order, one call each
        return scores

    lines = []
    for start in range(0, n_captions, CHUNK):
        prompts = []
        for index in range(start, min(n_captions, start + CHUNK)):
            rng = scene_rng(seed, "self", index)
            prompts.append(caption(sample_scene(rng, exclude_heldout=True), rng, raster).text(rng))
        best.clear()
        images = model.generate_image(prompts, candidates=candidates, rank_by=judge, seed=seed * 100_003 + start)
        for index, (prompt, image, score) in enumerate(zip(prompts, images, best, strict=True), start):
            name = f"images/{index:06d}.png"
            image.save(out / name)
            lines.append(json.dumps({"kind": "generation", "caption": prompt, "image": name, "judge": score}))
    manifest = out / "judged.jsonl"
    manifest.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return manifest


def keep_confident(manifest: str | Path, out: str | Path, min_score: float) -> int:
    """Copy the records of `manifest` whose judge score is at least `min_score` to `out` (beside it, so
    that image paths still resolve); return how many."""
    manifest, out = Path(manifest), Path(out)
    if out.parent.resolve() != manifest.parent.resolve():
        raise ValueError(f"{out} must be in {manifest.parent}, where the records' images are")
    kept = [line for line in manifest.read_text(encoding="utf-8").splitlines() if json.loads(line)["judge"] >= min_score]
    out.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return len(kept)
