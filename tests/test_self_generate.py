"""Self-training data (janus.train.self_generate): the kept picture of each caption is its best
candidate by the model's own clause questions, the files are reproducible by seed, and the
confidence filter keeps exactly the records at or above its threshold."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

import janus
from janus.data import read_records
from janus.data.shapes import parse_description
from janus.eval.clause_judge import clause_scores
from janus.testing import save_tiny_checkpoint
from janus.train.self_generate import keep_confident, write_judged_generations


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return janus.load(save_tiny_checkpoint(tmp_path_factory.mktemp("self") / "tiny"), device="cpu")


def test_each_kept_picture_is_its_captions_best_candidate_and_the_seed_fixes_the_files(model, tmp_path):
    manifest = write_judged_generations(model, tmp_path / "a", n_captions=5, seed=3, candidates=3)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 5
    for record in records:
        parse_description(record["caption"])  # in the grammar the judge reads
        image = Image.open(manifest.parent / record["image"]).convert("RGB")
        assert record["judge"] <= 0
        assert float(clause_scores(model, record["caption"], [image])[0]) == pytest.approx(record["judge"], abs=1e-4)
    again = write_judged_generations(model, tmp_path / "b", n_captions=5, seed=3, candidates=3)
    assert again.read_text() == manifest.read_text()
    for name in ("000000.png", "000004.png"):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    other = write_judged_generations(model, tmp_path / "c", n_captions=2, seed=4, candidates=3)
    assert other.read_text().splitlines() != manifest.read_text().splitlines()[:2]


def test_keep_confident_filters_by_score_and_keeps_images_resolvable(model, tmp_path):
    manifest = write_judged_generations(model, tmp_path, n_captions=6, seed=5, candidates=2)
    scores = sorted(json.loads(line)["judge"] for line in manifest.read_text().splitlines())
    threshold = scores[3]
    kept = keep_confident(manifest, tmp_path / "confident.jsonl", threshold)
    assert kept == sum(s >= threshold for s in scores) >= 3
    skipped: Counter = Counter()
    read = list(read_records(tmp_path / "confident.jsonl", skipped))
    assert len(read) == kept and not skipped and all(r.kind == "generation" for r in read)
    with pytest.raises(ValueError, match="where the records' images are"):
        keep_confident(manifest, tmp_path / "elsewhere" / "confident.jsonl", threshold)
    with pytest.raises(ValueError, match="candidates >= 2"):
        write_judged_generations(model, tmp_path / "x", n_captions=1, seed=0, candidates=1)
