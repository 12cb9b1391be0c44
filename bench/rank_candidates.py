"""How much can best-of-N generation gain, and how much of it does each way of ranking recover?

For the generation prompts of `janus eval shapes` (seed 1000, the model's sampling defaults), each
image gets N candidates. Every candidate is scored by the model (`Janus.image_loglik`, the likelihood
of its codes; `Janus.image_match`, the model's yes/no judgement that it shows the prompt; and
`clause_scores`, its answers to questions that check each clause of the prompt) and by the shapes
detector (correct or not). Then each ranking rule keeps one candidate per image, and the table gives
its accuracy per category, as the eval computes it:
- first: the first candidate (plain sampling, no ranking);
- likelihood, match, questions: `rank_by="likelihood"` / `"match"` / `clause_judge(model)`;
- likelihood + W x match: the two scores added;
- oracle: any correct candidate counts, the ceiling that a perfect judge would reach.
A second table gives each score's AUC: how well it separates the detector's correct candidates from the
wrong ones, over all candidates of a category (0.5 is chance). The JSON keeps every candidate's scores.
Only a model trained to answer the match question (janus.data.shapes.match_question) ranks by it usefully.

    python bench/rank_candidates.py --models runs/default/match/stage3/export --json bench/results/rank_candidates.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import janus
from janus.data.shapes import failed_clauses
from janus.eval.clause_judge import clause_scores
from janus.eval.detector import detect
from janus.eval.shapes_eval import EVAL_SEED, GEN_CATEGORIES, heldout_prompts

MATCH_WEIGHT = 5.0  # the likelihood spans ~15 nats across candidates, the match log-odds ~1.3


def score_candidates(model: janus.Janus, per_category: int, k: int, candidates: int) -> dict[str, list[dict]]:
    """Per category, per prompt: each candidate's likelihood, match and question scores and detector verdict."""
    pools = {}
    for index, category in enumerate(GEN_CATEGORIES):
        prompts = heldout_prompts(category, per_category)
        drawn = k * candidates
        codes = model.generate_image_tokens([p.text() for p in prompts], n=drawn, seed=EVAL_SEED + index)
        pools[category] = []
        for i, prompt in enumerate(prompts):
            rows = codes[i * drawn : (i + 1) * drawn]
            images = model.decode_image_tokens(rows)
            pools[category].append({
                "prompt": prompt.text(),
                "likelihood": model.image_loglik(prompt.text(), rows).tolist(),
                "match": model.image_match(prompt.text(), images).tolist(),
                "questions": clause_scores(model, prompt.text(), images).tolist(),
                "correct": [not failed_clauses(prompt, detect(image)) for image in images],
            })
    return pools


def _best(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)


# Each rule picks one of a run's candidates from their scores (a dict of lists); None: the oracle.
RULES = {
    "first": lambda run: 0,
    "likelihood": lambda run: _best(run["likelihood"]),
    "match": lambda run: _best(run["match"]),
    "questions": lambda run: _best(run["questions"]),
    f"likelihood + {MATCH_WEIGHT:g} x match": lambda run: _best([ll + MATCH_WEIGHT * m for ll, m in zip(run["likelihood"], run["match"])]),
    "oracle": None,
}
SCORES = ("likelihood", "match", "questions", "correct")


def accuracies(pools: dict[str, list[dict]], candidates: int) -> dict[str, dict[str, float]]:
    """Rule -> category (and "overall", their mean) -> accuracy of the candidates the rule keeps."""
    table = {}
    for name, rule in RULES.items():
        per_category = {}
        for category, prompts in pools.items():
            kept = []
            for p in prompts:
                for start in range(0, len(p["correct"]), candidates):
                    run = {key: p[key][start : start + candidates] for key in SCORES}
                    kept.append(any(run["correct"]) if rule is None else run["correct"][rule(run)])
            per_category[category] = sum(kept) / len(kept)
        table[name] = {"overall": sum(per_category.values()) / len(per_category), **per_category}
    return table


def aucs(pools: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Score -> category (and "all") -> AUC of the score for telling correct candidates from wrong ones."""
    table = {}
    for score in SCORES[:-1]:
        per_category = {}
        for category, prompts in [*pools.items(), ("all", [p for ps in pools.values() for p in ps])]:
            values = torch.tensor([v for p in prompts for v in p[score]])
            correct = torch.tensor([c for p in prompts for c in p["correct"]])
            right, wrong = values[correct], values[~correct]
            pairs = right[:, None] - wrong[None, :]
            per_category[category] = float((pairs > 0).float().mean() + 0.5 * (pairs == 0).float().mean()) if pairs.numel() else float("nan")
        table[score] = per_category
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[None], help="checkpoint directories (default: the built-in model)")
    parser.add_argument("--per-category", type=int, default=50, help="prompts per category (default 50)")
    parser.add_argument("--k", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per image (default 4)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {}
    for path in args.models:
        model = janus.load(path, device="cpu", dtype="float32")
        pools = score_candidates(model, args.per_category, args.k, args.candidates)
        table, separation = accuracies(pools, args.candidates), aucs(pools)
        name = path or "built-in"
        results[name] = {"accuracy": table, "auc": separation, "candidates": pools}
        print(f"{name}: {args.per_category} prompts x {args.k} images per category, best of {args.candidates}")
        print(f"  {'rule':<26}{'overall':>8}" + "".join(f"{c[:9]:>10}" for c in GEN_CATEGORIES))
        for rule, row in table.items():
            print(f"  {rule:<26}{row['overall']:8.3f}" + "".join(f"{row[c]:10.3f}" for c in GEN_CATEGORIES))
        print(f"  {'AUC of':<26}{'all':>8}" + "".join(f"{c[:9]:>10}" for c in GEN_CATEGORIES))
        for score, row in separation.items():
            print(f"  {score:<26}{row['all']:8.3f}" + "".join(f"{row[c]:10.3f}" for c in GEN_CATEGORIES))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
