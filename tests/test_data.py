"""Training data: readers, token sequences and their targets, the mixture, packing, the code cache.

Everything is made here: the tiny tokenizer, a tiny random model (its VQ gives the image codes) and
small PNG images written into JSONL manifests and tar shards.
"""

import hashlib
import io
import json
import random
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import janus.checkpoint
from janus.checkpoint import load_model
from janus.data import (
    KINDS,
    CodeCache,
    DataWarning,
    Mixture,
    PackedStream,
    Packer,
    SampleBuilder,
    build_sample,
    collate,
    encode_images,
    image_key,
    make_image_codes_fn,
    read_records,
    tokenize_images,
    write_code_cache,
)
from janus.data.mixture import KindStream
from janus.data.prefetch import Prefetcher
from janus.models.attention import Documents, attention, varlen_attention
from janus.models.config import JanusConfig
from janus.models.unified import IGNORE, JanusModel
from janus.processing import DEFAULT_SYSTEM_PROMPT, Tokenizer, generation_prompt, render_chat
from janus.processing.tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN
from janus.sampling import unconditional
from janus.testing import randomize, save_tiny_checkpoint, save_tiny_tokenizer

CFG = JanusConfig.preset("tiny")
ROLES = CFG.roles
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")


# ---------------------------------------------------------------- fixtures and data writers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one thread is as fast, and does not stall when other jobs share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def model():
    model = JanusModel(CFG).eval()
    randomize(model, seed=0)
    return model


@pytest.fixture(scope="module")
def codes_fn(model):
    return make_image_codes_fn(model.vq)


def hash_codes(image: Image.Image) -> torch.Tensor:
    """Stand-in VQ codes that depend on the image, for tests about the stream rather than the VQ."""
    digest = hashlib.sha1(image.tobytes()).digest()[: CFG.vq.num_tokens]
    return torch.tensor(list(digest)) % CFG.vq.codebook_size


def png(seed: int, size=(32, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def make_items(kind: str, n: int, prefix: str, seed: int = 0) -> list[tuple[str, dict, dict[str, bytes]]]:
    """(key, record, image files) for n records of one kind; image files are named KEY.i.png."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        key = f"{prefix}{i:04d}"
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        if kind == "text":
            items.append((key, {"kind": "text", "text": f"A small {colour} {shape} is left of a blue square."}, {}))
        elif kind == "generation":
            files = {f"{key}.0.png": png(seed * 1000 + i, (32 + 8 * (i % 3), 32))}
            record = {"kind": "generation", "caption": f"a {colour} {shape}", "image": f"{key}.0.png"}
            items.append((key, record, files))
        else:
            n_images = 1 + i % 2
            files = {f"{key}.{j}.png": png(seed * 1000 + 10 * i + j, (32, 24 + 8 * j)) for j in range(n_images)}
            conversation = [
                {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat colour is the {shape}?"},
                {"role": "assistant", "content": f"The {shape} is {colour}."},
            ]
            if n_images == 2:  # a second turn with a second image
                conversation += [
                    {"role": "user", "content": f"And here? {IMAGE_TOKEN}"},
                    {"role": "assistant", "content": f"There are {rng.choice(['two', 'three'])}."},
                ]
            items.append((key, {"kind": "understanding", "images": list(files), "conversation": conversation}, files))
    return items


def write_manifest(path, items, extra_lines=()):
    for _, _, files in items:
        for name, data in files.items():
            (path.parent / name).write_bytes(data)
    lines = [json.dumps(record) for _, record, _ in items] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tar(path, items):
    with tarfile.open(path, "w") as tar:
        for key, record, files in items:
            for name, data in {f"{key}.json": json.dumps(record).encode(), **files}.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Manifests for all kinds, and generation data also as two tar shards."""
    root = tmp_path_factory.mktemp("dataset")
    paths = {
        "understanding": [write_manifest(root / "und.jsonl", make_items("understanding", 8, "u", seed=1))],
        "text": [write_manifest(root / "text.jsonl", make_items("text", 10, "t", seed=2))],
        "generation": [
            write_manifest(root / "gen.jsonl", make_items("generation", 5, "g", seed=3)),
            write_tar(root / "gen-0.tar", make_items("generation", 3, "ga", seed=4)),
            write_tar(root / "gen-1.tar", make_items("generation", 3, "gb", seed=5)),
        ],
    }
    return paths


def read(path):
    skipped = Counter()
    return list(read_records(path, skipped)), skipped


# ---------------------------------------------------------------- records


def test_manifest_and_tar_yield_the_same_records(tmp_path):
    items = [*make_items("understanding", 3, "u"), *make_items("text", 2, "t"), *make_items("generation", 3, "g")]
    from_manifest, skipped_m = read(write_manifest(tmp_path / "m.jsonl", items))
    from_tar, skipped_t = read(write_tar(tmp_path / "m.tar", items))
    assert not skipped_m and not skipped_t
    assert len(from_manifest) == len(from_tar) == len(items)
    for a, b, (key, record, files) in zip(from_manifest, from_tar, items):
        assert a.kind == b.kind == record["kind"]
        assert a.data == b.data == record
        assert len(a.images) == len(b.images) == len(files)
        for x, y in zip(a.images, b.images):
            assert x.mode == y.mode == "RGB" and np.array_equal(np.asarray(x), np.asarray(y))
        assert a.source.endswith(f"m.jsonl:{items.index((key, record, files)) + 1}")
        assert b.source.endswith(f"m.tar:{key}")


def test_bad_manifest_lines_are_skipped_counted_and_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = make_items("text", 1, "t")
    bad_lines = [
        '{"kind": "text", "text": "unterminated',  # line 2
        json.dumps({"kind": "video", "path": "a.mp4"}),  # 3
        json.dumps({"kind": "text"}),  # 4
        json.dumps({"kind": "generation", "caption": "a red star", "image": "missing.png"}),  # 5
        json.dumps({"kind": "generation", "caption": "a red star", "image": "broken.png"}),  # 6
        json.dumps({"kind": "understanding", "images": ["broken.png"], "conversation": [  # 7: no placeholder
            {"role": "user", "content": "What?"}, {"role": "assistant", "content": "Red."}]}),
        json.dumps({"kind": "understanding", "images": [], "conversation": [  # 8: roles out of order
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Hello."}]}),
        "",  # 9: blank lines are not records
        "[1, 2, 3]",  # 10
    ]
    path = write_manifest(tmp_path / "bad.jsonl", good, bad_lines)
    with pytest.warns(DataWarning) as caught:
        records, skipped = read(path)
    assert [r.data for r in records] == [good[0][1]]
    expected_counts = {"bad json": 1, "unknown kind": 2, "bad fields": 3, "missing image": 1, "unreadable image": 1}
    assert skipped == Counter(expected_counts)
    messages = [str(w.message) for w in caught]
    expected = {2: "bad json", 3: "unknown kind", 4: "bad fields", 5: "missing image", 6: "unreadable image",
                7: "bad fields", 8: "bad fields", 10: "unknown kind"}
    assert len(messages) == len(expected)
    for line, reason in expected.items():
        assert any(f"bad.jsonl:{line}: {reason}" in m for m in messages), (line, reason, messages)


def test_bad_tar_samples_are_skipped_counted_and_named(tmp_path):
    good = make_items("generation", 2, "ok")
    path = tmp_path / "bad.tar"
    members = [
        ("missing.json", json.dumps({"kind": "generation", "caption": "a star", "image": "missing.0.png"}).encode()),
        ("broken.json", json.dumps({"kind": "generation", "caption": "a star", "image": "broken.0.png"}).encode()),
        ("broken.0.png", b"\x89PNG garbage"),
        ("nojson.0.png", png(0)),
        ("badjson.json", b"{not json"),
    ]
    write_tar(path, good[:1])
    with tarfile.open(path, "a") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.warns(DataWarning) as caught:
        records, skipped = read(path)
    assert [r.data for r in records] == [good[0][1]]
    assert skipped == Counter({"missing image": 1, "unreadable image": 1, "no json member": 1, "bad json": 1})
    messages = " | ".join(str(w.message) for w in caught)
    for key in ("missing", "broken", "nojson", "badjson"):
        assert f"bad.tar:{key}: " in messages

    # A truncated shard: the samples before the damage are kept, the rest is one counted skip.
    whole = write_tar(tmp_path / "whole.tar", good).read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])
    with pytest.warns(DataWarning, match="cut.tar: unreadable shard"):
        records, skipped = read(tmp_path / "cut.tar")
    assert [r.data for r in records] == [good[0][1]] and skipped == Counter({"unreadable shard": 1})


# ---------------------------------------------------------------- sequences


def collapse_images(ids: list[int], tokenizer) -> list[int]:
    """Undo expand_image_tokens: each <begin_of_image> N x placeholder <end_of_image> back to one placeholder."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == tokenizer.boi_id:
            assert ids[i + 1 : i + 1 + CFG.vision.num_patches] == [tokenizer.image_id] * CFG.vision.num_patches
            assert ids[i + 1 + CFG.vision.num_patches] == tokenizer.eoi_id
            out.append(tokenizer.image_id)
            i += CFG.vision.num_patches + 2
        else:
            out.append(ids[i])
            i += 1
    return out


def test_understanding_loss_is_on_the_answers_only(dataset, tokenizer, codes_fn):
    records, _ = read(dataset["understanding"][0])
    record = next(r for r in records if len(r.images) == 2)  # two turns, two images
    sample = build_sample(record, tokenizer, ROLES, CFG, codes_fn, random.Random(0))
    conversation = record.data["conversation"]
    ids = sample.tokens.tolist()

    rendered = render_chat(conversation, ROLES, DEFAULT_SYSTEM_PROMPT)
    assert tokenizer.decode(collapse_images(ids, tokenizer), skip_special=False) == BOS_TOKEN + rendered

    # Targets are exactly " answer<EOS>" per assistant turn, each predicted by the position before it.
    counted = (sample.targets != IGNORE).nonzero().flatten().tolist()
    assert torch.equal(sample.targets[counted], sample.tokens[[t + 1 for t in counted]])
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    runs = np.split(np.array(counted), np.where(np.diff(counted) != 1)[0] + 1)
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert tokenizer.decode(sample.targets[run.tolist()].tolist(), skip_special=False) == f" {answer}{EOS_TOKEN}"
        cue = tokenizer.decode(ids[: run[0] + 1], skip_special=False)
        assert cue.endswith(f"{ROLES[1]}:")  # the answer follows the assistant cue, as at inference
    assert not sample.target_is_code.any() and not sample.code_mask.any()
    assert sample.kind == KINDS.index("understanding")

    assert sample.image_mask.sum() == 2 * CFG.vision.num_patches
    assert torch.equal(sample.image_mask, sample.tokens == tokenizer.image_id)
    assert not (sample.image_mask[1:] & (sample.targets[:-1] != IGNORE)).any()  # no loss on image positions
    assert sample.pixels.shape == (2, 3, CFG.vision.image_size, CFG.vision.image_size)


def test_text_loss_is_on_every_next_token(dataset, tokenizer, codes_fn):
    record = read(dataset["text"][0])[0][0]
    sample = build_sample(record, tokenizer, ROLES, CFG, codes_fn, random.Random(0))
    expected = [*tokenizer.encode(record.data["text"]), tokenizer.eos_id]
    assert sample.tokens.tolist() == expected
    assert sample.targets.tolist() == expected[1:] + [IGNORE]
    assert not sample.target_is_code.any() and not sample.code_mask.any() and not sample.image_mask.any()
    assert sample.kind == KINDS.index("text") and sample.pixels is None


def test_generation_loss_is_on_the_image_codes_only(dataset, tokenizer, model, codes_fn):
    record = read(dataset["generation"][0])[0][0]
    sample = build_sample(record, tokenizer, ROLES, CFG, codes_fn, random.Random(0), uncond_prob=0.0)
    prompt = tokenizer.encode(generation_prompt(record.data["caption"], ROLES))
    codes = encode_images(model.vq, record.images)[0]
    n = CFG.vq.num_tokens
    assert prompt[-1] == tokenizer.boi_id and len(sample) == len(prompt) + n
    assert sample.tokens[: len(prompt)].tolist() == prompt and torch.equal(sample.tokens[len(prompt) :], codes)
    assert sample.code_mask.tolist() == [False] * len(prompt) + [True] * n
    # <begin_of_image> predicts code 0, code i predicts code i + 1, the last code predicts nothing.
    assert sample.targets.tolist() == [IGNORE] * (len(prompt) - 1) + codes.tolist() + [IGNORE]
    assert torch.equal(sample.target_is_code, sample.targets != IGNORE)
    assert sample.kind == KINDS.index("generation") and sample.pixels is None and not sample.image_mask.any()

    uncond = build_sample(record, tokenizer, ROLES, CFG, codes_fn, random.Random(0), uncond_prob=1.0)
    assert uncond.tokens[: len(prompt)].tolist() == unconditional(prompt, tokenizer.pad_id)
    assert torch.equal(uncond.targets, sample.targets) and torch.equal(uncond.tokens[len(prompt) :], codes)


def test_unconditional_rate_is_about_ten_percent(dataset, tokenizer):
    record = read(dataset["generation"][0])[0][0]
    pads_after_bos = []
    for seed in (0, 1):
        rng = random.Random(seed)
        draws = [build_sample(record, tokenizer, ROLES, CFG, lambda im: torch.zeros(16, dtype=torch.long), rng)
                 for _ in range(2000)]
        pads_after_bos.append([int(s.tokens[1]) == tokenizer.pad_id for s in draws])
    for draws in pads_after_bos:
        assert 0.08 < np.mean(draws) < 0.12
    assert pads_after_bos[0] != pads_after_bos[1]  # the rng decides, not a fixed pattern


# ---------------------------------------------------------------- mixture


def test_mixture_matches_the_ratios_and_the_seed(dataset):
    ratios = {"understanding": 2, "text": 3, "generation": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # clean data: nothing is skipped
        kinds = [r.kind for r in (lambda m: [next(m) for _ in range(3000)])(Mixture(dataset, ratios, seed=0))]
    counts = Counter(kinds)
    for kind, ratio in ratios.items():
        assert abs(counts[kind] / len(kinds) - ratio / 10) < 0.025, counts

    def first(seed, n=40):
        mixture = Mixture(dataset, ratios, seed=seed)
        return [next(mixture).source for _ in range(n)]

    assert first(0) == first(0)
    assert first(0) != first(1)

    mixture = Mixture({"understanding": dataset["understanding"], "generation": dataset["generation"]},
                      {"understanding": 1, "text": 0, "generation": 3}, seed=0)
    assert {next(mixture).kind for _ in range(200)} == {"understanding", "generation"}


def test_each_kind_reshuffles_per_epoch_and_streams_shards_whole(dataset):
    stream = KindStream("generation", dataset["generation"], seed=0, skipped=Counter())
    epoch_size = 5 + 3 + 3
    sources = [next(stream).source for _ in range(3 * epoch_size)]
    epochs = [sources[i * epoch_size : (i + 1) * epoch_size] for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and len(set(epochs[0])) == epoch_size
    assert len({tuple(e) for e in epochs}) == 3
    for epoch in epochs:
        for shard in ("gen-0.tar", "gen-1.tar"):
            at = [i for i, s in enumerate(epoch) if shard in s]
            assert at == list(range(at[0], at[0] + 3))  # a shard is streamed whole, in its own order
            assert [epoch[i].rsplit(":", 1)[1] for i in at] == sorted(epoch[i].rsplit(":", 1)[1] for i in at)


def test_mixture_errors(dataset, tmp_path):
    with pytest.raises(ValueError, match="no data files"):
        Mixture({"text": dataset["text"]}, {"text": 1, "generation": 1})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no text data"):
        Mixture({"text": [tmp_path / "empty.jsonl"]}, {"text": 1})
    with pytest.raises(ValueError, match="unknown data kinds"):
        Mixture({"video": dataset["text"]}, {"video": 1})
    with pytest.raises(FileNotFoundError):
        Mixture({"text": [tmp_path / "absent.jsonl"]}, {"text": 1})
    (tmp_path / "bad.jsonl").write_text("{broken\n" * 3)
    mixture = Mixture({"text": [tmp_path / "bad.jsonl"]}, {"text": 1})
    with pytest.warns(DataWarning), pytest.raises(RuntimeError, match="no usable text record"):
        next(mixture)


def test_mixture_resumes_exactly(dataset):
    ratios = {"understanding": 2, "text": 3, "generation": 5}
    reference = Mixture(dataset, ratios, seed=7)
    expected = [next(reference).source for _ in range(60)]
    resumed_mid_shard = False
    for k in (5, 13, 21, 34):
        mixture = Mixture(dataset, ratios, seed=7)
        taken = [next(mixture).source for _ in range(k)]
        state = json.loads(json.dumps(mixture.state_dict()))  # survives JSON
        resumed_mid_shard |= state["streams"]["generation"]["in_shard"] > 0
        fresh = Mixture(dataset, ratios, seed=123)  # the state, not the seed, decides
        fresh.load_state_dict(state)
        assert taken + [next(fresh).source for _ in range(60 - k)] == expected
    assert resumed_mid_shard


# ---------------------------------------------------------------- packing


def make_stream(dataset, tokenizer, seq_len=160, max_len=160, seed=0):
    mixture = Mixture(dataset, {"understanding": 2, "text": 3, "generation": 5}, seed=seed)
    builder = SampleBuilder(tokenizer, CFG, hash_codes, max_len=max_len, uncond_prob=0.5, seed=seed)
    return PackedStream(mixture, builder, Packer(seq_len, tokenizer.pad_id))


def assert_batches_equal(a, b):
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


def test_packed_stream_resumes_exactly(dataset, tokenizer):
    stream = make_stream(dataset, tokenizer)
    expected = [next(stream) for _ in range(8)]
    for k in (1, 3):
        stream = make_stream(dataset, tokenizer)
        rows = [next(stream) for _ in range(k)]
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = make_stream(dataset, tokenizer, seed=99)
        resumed.load_state_dict(state)
        rows += [next(resumed) for _ in range(8 - k)]
        for a, b in zip(rows, expected):
            assert_batches_equal(a, b)
    batch = collate(expected)
    assert batch.tokens.shape == (8, 160) and (batch.doc_ids.max(1).values >= 1).any()  # rows hold several documents
    assert set(batch.kinds.unique().tolist()) == {-1, 0, 1, 2}


def test_prefetcher_gives_the_stream_rows_and_the_consumed_position(dataset, tokenizer):
    stream = make_stream(dataset, tokenizer)
    expected = [next(stream) for _ in range(8)]
    states = []
    plain = make_stream(dataset, tokenizer)
    for _ in range(3):
        next(plain)
        states.append(plain.state_dict())
    prefetcher = Prefetcher(make_stream(dataset, tokenizer), depth=4)
    rows = []
    for k in range(3):
        rows.append(next(prefetcher))
        # The thread has read ahead by now, but the state is the consumed rows' position.
        assert prefetcher.state_dict() == states[k]
    state = json.loads(json.dumps(prefetcher.state_dict()))
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    resumed = make_stream(dataset, tokenizer, seed=99)
    resumed.load_state_dict(state)
    rows += [next(resumed) for _ in range(5)]
    for a, b in zip(rows, expected):
        assert_batches_equal(a, b)


def test_prefetcher_passes_stream_errors_to_the_consumer():
    class Broken:
        skipped: dict = {}

        def state_dict(self):
            return {}

        def __next__(self):
            raise OSError("disk gone")

    prefetcher = Prefetcher(Broken(), depth=2)
    with pytest.raises(OSError, match="disk gone"):
        next(prefetcher)
    prefetcher.close()
    with pytest.raises(ValueError, match="at least 1"):
        Prefetcher(Broken(), depth=0)


def test_over_long_samples_are_skipped(dataset, tokenizer):
    # Understanding samples (system prompt + 16 image tokens per image) are the only ones over 64 tokens.
    stream = make_stream(dataset, tokenizer, seq_len=64, max_len=64)
    with pytest.warns(DataWarning, match=r"und\.jsonl:\d+: over-long"):
        batch = collate([next(stream) for _ in range(20)])
    assert stream.mixture.skipped["over-long"] > 0 and set(stream.mixture.skipped) == {"over-long"}
    assert 0 not in batch.kinds.tolist()


@pytest.mark.filterwarnings("ignore::janus.data.records.DataWarning")
def test_prefetcher_counts_the_skipped_records_of_the_consumed_rows(dataset, tokenizer):
    plain = make_stream(dataset, tokenizer, seq_len=64, max_len=64)
    prefetcher = Prefetcher(make_stream(dataset, tokenizer, seq_len=64, max_len=64), depth=8)
    counts = []
    for _ in range(20):
        next(plain)
        counts.append(plain.skipped)
    for k in range(20):
        next(prefetcher)
        assert prefetcher.skipped == counts[k]  # not the read-ahead's
    prefetcher.close()
    assert counts[-1]["over-long"] > counts[0].get("over-long", 0)  # the count does move with the rows


def test_document_mask():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1, -1]])
    mask = Documents(doc_ids).mask[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def reference_varlen_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """flash_attn_varlen_func's contract in plain PyTorch: causal attention within each run."""
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k) and causal
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    assert max_seqlen_q == max_seqlen_k == max(lengths) and sum(lengths) == q.shape[0]
    out = []
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        run = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*run, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(out)


def test_documents_runs_and_varlen_path_match_the_dense_mask():
    """The flash-attn varlen path (runs over flattened rows) computes what the dense document mask
    computes at every non-padding position, grouped KV heads included. On CPU the kernel is a
    plain-PyTorch stand-in with flash-attn's signature; on CUDA flash-attn's own kernel runs."""
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1, -1], [0, 0, 0, 0, 0, 0, 0], [0, 1, 2, 2, 2, 2, -1]])
    docs = Documents(doc_ids)
    cu_seqlens, longest = docs.runs
    assert cu_seqlens.tolist() == [0, 2, 5, 7, 14, 15, 16, 20, 21] and longest == 7
    torch.manual_seed(0)
    q = torch.randn(3, 4, 7, 8)
    k, v = torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    varlen = varlen_attention(q, k, v, docs, kernel=reference_varlen_kernel)
    dense = attention(q, k, v, docs)  # no flash-attn here: the dense mask
    real = (doc_ids >= 0)[:, None, :, None].expand_as(q)
    torch.testing.assert_close(varlen[real], dense[real])
    assert not torch.equal(dense, attention(q, k, v, None))  # the documents really separate


def test_packed_loss_equals_unpacked_loss(dataset, tokenizer, model, codes_fn):
    und = read(dataset["understanding"][0])[0]
    text = read(dataset["text"][0])[0]
    gen = read(dataset["generation"][0])[0]
    records = [und[0], und[1], text[0], gen[0], text[1], gen[1], text[2], gen[2], und[2]]
    rng = random.Random(0)
    samples = [build_sample(r, tokenizer, ROLES, CFG, codes_fn, rng, uncond_prob=0.5) for r in records]
    packer = Packer(260, tokenizer.pad_id)
    rows = [row for row in map(packer.add, samples) if row is not None] + [packer.row()]
    batch = collate(rows)
    assert len(rows) >= 2 and (batch.doc_ids == -1).any() and (batch.doc_ids.max(1).values >= 1).all()
    assert batch.pixels.shape[0] == sum(len(r.images) for r in records if r.kind == "understanding")
    documents = iter(samples)
    for b in range(len(rows)):
        for d in range(int(batch.doc_ids[b].max()) + 1):
            s, at = next(documents), batch.doc_ids[b] == d
            assert torch.equal(batch.tokens[b][at], s.tokens) and torch.equal(batch.targets[b][at], s.targets)
            assert batch.positions[b][at].tolist() == list(range(len(s)))  # RoPE restarts per document
            assert (batch.kinds[b][at] == s.kind).all()
    padding = batch.doc_ids == -1
    assert (batch.tokens[padding] == tokenizer.pad_id).all() and (batch.targets[padding] == IGNORE).all()
    assert (batch.kinds[padding] == -1).all()

    with torch.no_grad():
        hidden = model(batch.tokens, batch.image_mask, batch.pixels, batch.code_mask, batch.positions,
                       Documents(batch.doc_ids))
        packed = model.token_losses(hidden, batch.targets, batch.target_is_code)
        assert not packed[batch.doc_ids == -1].any()
        doc_losses = [packed[b][batch.doc_ids[b] == d].sum() for b in range(len(rows))
                      for d in range(int(batch.doc_ids[b].max()) + 1)]
        alone = []
        for s in samples:
            h = model(s.tokens[None], s.image_mask[None], s.pixels, s.code_mask[None])
            alone.append(model.token_losses(h, s.targets[None], s.target_is_code[None]).sum())
    assert len(doc_losses) == len(samples)
    assert all(loss > 0 for loss in alone)
    torch.testing.assert_close(torch.stack(doc_losses), torch.stack(alone), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- code cache


def test_code_cache_matches_on_the_fly_encoding(dataset, model, tmp_path):
    # The manifest again, plus a copy of one image under another name: one cache row for both.
    paths = [*dataset["generation"], dataset["text"][0]]
    duplicate = read(dataset["generation"][0])[0][0]
    duplicate.images[0].save(tmp_path / "copy.png")
    (tmp_path / "dup.jsonl").write_text(json.dumps({**duplicate.data, "image": "copy.png"}) + "\n")
    cache = write_code_cache([*paths, tmp_path / "dup.jsonl"], model.vq, tmp_path / "cache", batch_size=4)
    assert len(cache) == 11
    loaded = CodeCache.load(tmp_path / "cache")
    assert loaded.codes.dtype == np.int16
    cached_fn, live_fn = make_image_codes_fn(model.vq, [loaded]), make_image_codes_fn(model.vq)
    for path in dataset["generation"]:
        for record in read(path)[0]:
            image = record.images[0]
            live = live_fn(image)
            assert torch.equal(loaded.get(image_key(image)), live) and torch.equal(cached_fn(image), live)
    assert loaded.get("0" * 40) is None

    other = JanusModel(CFG)
    randomize(other, seed=1)
    with pytest.raises(ValueError, match="another VQ model"):
        make_image_codes_fn(other.vq, [loaded])


def test_several_code_caches_are_searched_in_order_then_encoded_on_the_fly(dataset, model, tmp_path):
    manifest, shard, uncached = dataset["generation"]
    first = write_code_cache([manifest], model.vq, tmp_path / "first")
    second = write_code_cache([manifest, shard], model.vq, tmp_path / "second")
    # Zeroed codes mark the rows that came from the second cache.
    second = CodeCache(np.zeros_like(second.codes), second.index)
    image_codes, live_fn = make_image_codes_fn(model.vq, [first, second]), make_image_codes_fn(model.vq)
    for path, source in ((manifest, "first"), (shard, "second"), (uncached, "encoded")):
        for record in read(path)[0]:
            live = live_fn(record.images[0])
            assert live.any()
            expected = torch.zeros_like(live) if source == "second" else live
            assert torch.equal(image_codes(record.images[0]), expected), (path, source)


def test_a_cache_made_where_auto_means_bfloat16_is_accepted_by_training(dataset, tmp_path, monkeypatch):
    """On CUDA, load_model's "auto" dtype is bfloat16, but training's VQ runs in float32: the cache
    must be made in float32 or its codebook check refuses it."""
    checkpoint = save_tiny_checkpoint(tmp_path / "model", seed=0)
    resolve = janus.checkpoint._resolve_dtype
    monkeypatch.setattr(janus.checkpoint, "_resolve_dtype", lambda dtype, device: torch.bfloat16 if dtype == "auto" else resolve(dtype, device))
    cache = tokenize_images(dataset["generation"][:1], checkpoint, tmp_path / "cache", device="cpu")
    make_image_codes_fn(load_model(checkpoint, "cpu", torch.float32).vq, [cache])


def test_tokenize_images_from_a_checkpoint(dataset, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "model", seed=0)
    cache = tokenize_images(dataset["generation"], checkpoint, tmp_path / "cache", device="cpu")
    model = JanusModel(CFG)
    randomize(model, seed=0)
    record = read(dataset["generation"][1])[0][0]
    assert torch.equal(cache.get(image_key(record.images[0])), encode_images(model.vq, record.images)[0])
