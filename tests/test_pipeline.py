"""The public API and the sampler's guarantees, on a tiny random checkpoint."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import janus
from janus.checkpoint import CheckpointError
from janus.data.records import Record
from janus.data.sequences import build_sample
from janus.models.unified import IGNORE
from janus.processing.chat import MATCH_QUESTION
from janus.processing.tokenizer import IMAGE_TOKEN
from janus.sampling import Sampling, generate_image_codes, sample
from janus.testing import cache_buffers, save_tiny_checkpoint, steer_eos


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("pipe") / "tiny")
    return janus.load(path, device="cpu", dtype="float32")


def test_generate_image_returns_images_and_codes(pipe):
    images = pipe.generate_image(["a red circle", "two blue squares"], n=2, seed=0)
    assert len(images) == 4 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
    codes = pipe.generate_image_tokens("a red circle", n=3, seed=0)
    assert codes.shape == (3, pipe.cfg.vq.num_tokens) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < pipe.cfg.vq.codebook_size
    decoded = pipe.decode_image_tokens(codes)
    assert len(decoded) == 3 and decoded[0].mode == "RGB"


def test_same_seed_same_images_other_seed_differs(pipe):
    a = pipe.generate_image_tokens(["a red circle", "a star"], n=2, seed=7)
    b = pipe.generate_image_tokens(["a red circle", "a star"], n=2, seed=7)
    c = pipe.generate_image_tokens(["a red circle", "a star"], n=2, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # the n images of one prompt are different samples


def _conditional_loglik(pipe, prompt: str, codes: torch.Tensor) -> torch.Tensor:
    """Each row's log-likelihood of its codes given the prompt, by one teacher-forced forward pass."""
    text = torch.tensor(pipe.tokenizer.encode(janus.processing.chat.generation_prompt(prompt, pipe.cfg.roles)))
    tokens = torch.cat([text.expand(len(codes), -1), codes], 1)
    code_mask = torch.zeros_like(tokens, dtype=torch.bool)
    code_mask[:, len(text) :] = True
    with torch.no_grad():
        hidden = pipe.model(tokens, code_mask=code_mask)[:, len(text) - 1 : -1]
        return pipe.model.image_logits(hidden).float().log_softmax(-1).gather(2, codes[..., None])[..., 0].sum(1)


def test_candidates_keep_the_most_likely_of_each_run(pipe):
    # The same seed and rows draw the same images, so n * candidates plain draws are the candidates.
    drawn = pipe.generate_image_tokens("a red circle", n=6, seed=3)
    kept = pipe.generate_image_tokens("a red circle", n=2, candidates=3, seed=3)  # rank_by="likelihood" is the default
    loglik = _conditional_loglik(pipe, "a red circle", drawn).view(2, 3)
    assert torch.allclose(pipe.image_loglik("a red circle", drawn), loglik.flatten(), atol=1e-4)
    assert loglik.max(1).values.sub(loglik.min(1).values).min() > 1e-3  # the runs' candidates differ in score
    expected = drawn.view(2, 3, -1)[torch.arange(2), loglik.argmax(1)]
    assert torch.equal(kept, expected)
    with pytest.raises(ValueError, match="candidates must be a positive integer"):
        pipe.generate_image_tokens("a red circle", candidates=0)
    with pytest.raises(ValueError, match="rank_by must be one of"):
        pipe.generate_image_tokens("a red circle", candidates=2, rank_by="clip")


def _answer_logprob(pipe, question: str, image: Image.Image, answer: str) -> float:
    """log P(answer) to the question about the image, as training scores it: the answer's tokens (its
    end token left out) in the sequence the training data builder makes of that conversation."""
    conversation = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}, {"role": "assistant", "content": answer}]
    record = Record("understanding", {"conversation": conversation}, [image], "test")
    sample = build_sample(record, pipe.tokenizer, pipe.cfg.roles, pipe.cfg, None, random.Random(0))
    with torch.no_grad():
        hidden = pipe.model(sample.tokens[None], sample.image_mask[None], sample.pixels)
        losses = pipe.model.token_losses(hidden, sample.targets[None], sample.target_is_code[None])[0]
    answer_positions = (sample.targets != IGNORE).nonzero()[:-1, 0]
    return -float(losses[answer_positions].sum())


def test_image_match_is_the_log_odds_of_yes_against_no(pipe):
    images = pipe.generate_image("a red circle", n=3, seed=0)
    scores = pipe.image_match("a red circle", images, batch_size=2)
    for image, score in zip(images, scores):
        logp = {a: _answer_logprob(pipe, MATCH_QUESTION.format("a red circle"), image, a) for a in ("yes", "Yes", "no", "No")}
        expected = math.log(math.exp(logp["yes"]) + math.exp(logp["Yes"])) - math.log(math.exp(logp["no"]) + math.exp(logp["No"]))
        assert float(score) == pytest.approx(expected, abs=1e-4)
    assert float(scores.max() - scores.min()) > 1e-4  # the images are told apart
    with pytest.raises(ValueError, match="at least one image"):
        pipe.image_match("a red circle", [])


def test_answer_logprobs_score_each_answer_whole(pipe):
    images = pipe.generate_image("two blue squares", n=3, seed=1)
    answers = ["two", "three", "a small red circle to the left of a star"]
    assert len({len(pipe.tokenizer.encode(f" {a}", bos=False)) for a in answers}) > 1  # rows of different widths
    logp = pipe.answer_logprobs("How many squares are there?", answers, images, batch_size=2)
    assert logp.shape == (3, 3)
    for image, row in zip(images, logp):
        for answer, value in zip(answers, row):
            assert float(value) == pytest.approx(_answer_logprob(pipe, "How many squares are there?", image, answer), abs=1e-4)
    with pytest.raises(ValueError, match="answers must be"):
        pipe.answer_logprobs("How many squares are there?", ["two", ""], images)


def test_candidates_ranked_by_match_keep_each_runs_best_judged(pipe):
    prompts = ["a red circle", "two blue squares"]
    drawn = pipe.generate_image_tokens(prompts, n=4, seed=3)
    kept = pipe.generate_image_tokens(prompts, n=2, candidates=2, seed=3, rank_by="match")
    scores = torch.cat([pipe.image_match(p, pipe.decode_image_tokens(drawn[4 * i : 4 * i + 4])) for i, p in enumerate(prompts)])
    scores = scores.view(4, 2)
    assert scores.max(1).values.sub(scores.min(1).values).min() > 1e-4  # every run's candidates differ in score
    expected = drawn.view(4, 2, -1)[torch.arange(4), scores.argmax(1)]
    assert torch.equal(kept, expected)


def test_candidates_ranked_by_a_judge_function_keep_each_runs_best_judged(pipe):
    prompts = ["a red circle", "two blue squares"]
    drawn = pipe.generate_image_tokens(prompts, n=4, seed=3)
    judged = []

    def brightness(prompt, images):
        judged.append(prompt)
        return torch.tensor([float(np.asarray(image).mean()) for image in images])

    kept = pipe.generate_image_tokens(prompts, n=2, candidates=2, seed=3, rank_by=brightness)
    assert judged == prompts
    scores = brightness(None, pipe.decode_image_tokens(drawn)).view(4, 2)
    assert scores.max(1).values.sub(scores.min(1).values).min() > 1e-4  # every run's candidates differ in score
    assert torch.equal(kept, drawn.view(4, 2, -1)[torch.arange(4), scores.argmax(1)])
    with pytest.raises(ValueError, match="one score per image: 4 images, got shape \\[1\\]"):
        pipe.generate_image_tokens(prompts, n=2, candidates=2, seed=3, rank_by=lambda prompt, images: torch.zeros(1))
    with pytest.raises(ValueError, match="rank_by must be one of"):
        pipe.generate_image_tokens(prompts, candidates=2, rank_by="brightness")


def test_judged_images_are_returned_without_a_second_decode(pipe, monkeypatch):
    prompts = ["a red circle", "two blue squares"]
    codes = pipe.generate_image_tokens(prompts, n=2, candidates=2, seed=3, rank_by=brightness_judge)
    expected = pipe.decode_image_tokens(codes)
    decoded = []
    decode = pipe.decode_image_tokens
    monkeypatch.setattr(pipe, "decode_image_tokens", lambda tokens: decoded.append(len(tokens)) or decode(tokens))
    images = pipe.generate_image(prompts, n=2, candidates=2, seed=3, rank_by=brightness_judge)
    assert decoded == [4, 4]  # each prompt's 4 candidates, once; the kept 4 are not decoded again
    assert [np.asarray(i).tolist() for i in images] == [np.asarray(i).tolist() for i in expected]


def brightness_judge(prompt, images):
    return torch.tensor([float(np.asarray(image).mean()) for image in images])


def test_batched_prompts_equal_each_alone_greedy(pipe):
    prompts = ["a red circle", "three small green triangles above a blue square", "a star"]
    batched = pipe.generate_image_tokens(prompts, n=2, temperature=0)
    for i, prompt in enumerate(prompts):
        alone = pipe.generate_image_tokens(prompt, n=1, temperature=0)
        assert torch.equal(batched[2 * i], alone[0]) and torch.equal(batched[2 * i + 1], alone[0])
    assert not torch.equal(batched[0], batched[2])  # different prompts give different images
    chunked = pipe.generate_image_tokens(prompts, n=2, temperature=0, batch_size=4)
    assert torch.equal(chunked, batched)


def _chi2_critical(df: int, z: float = 3.29) -> float:
    """Upper 0.9995 quantile of chi-square(df) by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _assert_frequencies_match(samples: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    big = expected >= 5  # pool rare outcomes so every cell is large enough for the test
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expect = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expect > 0
    stat = float(((observed[keep] - expect[keep]) ** 2 / expect[keep]).sum())
    assert stat < _chi2_critical(int(keep.sum()) - 1), stat
    assert counts[probs == 0].sum() == 0


def test_sampled_image_tokens_follow_softmax(pipe):
    """cfg_weight=1, temperature=1: the first image token's frequencies equal the model's softmax."""
    prompt = pipe.tokenizer.encode(janus.processing.chat.generation_prompt("a red circle", pipe.cfg.roles))
    with torch.no_grad():
        hidden = pipe.model(torch.tensor([prompt]))[:, -1]
        probs = pipe.model.image_logits(hidden).float().softmax(-1)[0]
    assert probs.max() < 0.5  # a spread distribution, so the test has power
    generator = torch.Generator().manual_seed(0)
    codes = generate_image_codes(pipe.model, [prompt] * 4000, pipe.tokenizer.pad_id, 1.0, Sampling(1.0), generator)
    _assert_frequencies_match(codes[:, 0], probs)


@pytest.mark.parametrize("top_k,top_p", [(None, None), (5, None), (None, 0.6), (8, 0.8)])
def test_sample_top_k_top_p_distribution(top_k, top_p):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 1.5
    probs = (logits / 0.7).softmax(-1)
    keep = torch.ones(40, dtype=torch.bool)
    if top_k is not None:
        keep &= probs >= probs.topk(top_k).values[-1]
    if top_p is not None:  # applied to the top-k renormalised distribution, as transformers' warpers do
        kept = torch.where(keep, probs, 0.0) / probs[keep].sum()
        order = kept.argsort(descending=True)
        before = kept[order].cumsum(0) - kept[order]
        keep[order[before >= top_p]] = False
    target = torch.where(keep, probs, 0.0)
    target /= target.sum()
    draws = sample(logits.expand(60000, -1), Sampling(0.7, top_k, top_p), torch.Generator().manual_seed(2))
    _assert_frequencies_match(draws, target)


def test_chat_answers_streams_and_takes_history(pipe, tmp_path):
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    image.save(tmp_path / "red.png")
    answer = pipe.chat("what colour is it?", images=[tmp_path / "red.png"], max_new_tokens=12)
    assert isinstance(answer, str) and answer
    pieces = list(pipe.chat("what colour is it?", images=[image], max_new_tokens=12, stream=True))
    assert "".join(pieces) == answer and len(pieces) > 1
    history = [
        {"role": "user", "content": "what colour is it?", "images": [image]},
        {"role": "assistant", "content": answer},
    ]
    follow_up = pipe.chat("and its shape?", images=[image, image], history=history, max_new_tokens=8)
    assert isinstance(follow_up, str)
    sampled = [pipe.chat("hello", temperature=1.0, seed=s, max_new_tokens=10) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_chat_system_turn_replaces_the_default_system_prompt(pipe):
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    system = {"role": "system", "content": "Answer in one word."}
    tokens, _ = pipe._chat_inputs([system, {"role": "user", "content": "hi", "images": [image]}])
    rendered = janus.processing.chat.render_chat(
        [{"role": "user", "content": "<image_placeholder>\nhi"}, {"role": "assistant", "content": ""}], pipe.cfg.roles,
        "Answer in one word.",
    )
    ids = janus.processing.chat.expand_image_tokens(pipe.tokenizer.encode(rendered), pipe.tokenizer, pipe.cfg.vision.num_patches, 1)
    assert tokens[0].tolist() == ids
    with_system = pipe.chat("hi", images=[image], history=[system], max_new_tokens=8)
    assert with_system != pipe.chat("hi", images=[image], max_new_tokens=8)
    with pytest.raises(ValueError, match="system turn"):
        pipe.chat("hi", history=[{"role": "system", "content": "s", "images": [image]}])


def test_chat_answer_stops_at_the_end_of_the_context(pipe):
    """max_new_tokens is a cap: far past the context it still answers (the KV cache, sized to the
    context, would fail on any token beyond it)."""
    prompt_len = len(pipe.tokenizer.encode(janus.processing.chat.render_chat(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}], pipe.cfg.roles)))
    pieces = list(pipe.chat("hello", max_new_tokens=10_000, temperature=1.0, seed=0, stream=True))
    assert 0 < len(pieces) <= pipe.cfg.decoder.max_seq_len - prompt_len


def test_chat_stream_says_why_the_answer_ended(tmp_path):
    pipe = janus.load(save_tiny_checkpoint(tmp_path / "tiny"), device="cpu", dtype="float32")
    steer_eos(pipe, towards=False)
    stream = pipe.chat("hello", max_new_tokens=6, stream=True)
    assert stream.finish_reason is None  # not known before the answer is over
    assert "".join(stream) and stream.finish_reason == "length" and stream.completion_tokens == 6
    assert stream.prompt_tokens == pipe._chat_inputs([{"role": "user", "content": "hello"}])[0].shape[1]
    # at the end of the context, too
    stream = pipe.chat("hello", max_new_tokens=10_000, stream=True)
    list(stream)
    assert stream.finish_reason == "length"
    steer_eos(pipe, towards=True)
    stream = pipe.chat("hello", max_new_tokens=6, stream=True)
    assert "".join(stream) == "" and stream.finish_reason == "stop" and stream.completion_tokens == 1  # EOS


def test_chat_never_samples_past_the_tokenizer_vocabulary(tmp_path):
    # A head wider than the tokenizer, as in real checkpoints (102400 rows, ~100k tokens).
    pipe = janus.load(save_tiny_checkpoint(tmp_path / "wide", vocab_size=600), device="cpu", dtype="float32")
    with torch.no_grad():
        pipe.model.decoder.lm_head.weight[512:] = 0
        pipe.model.decoder.lm_head.weight[512:, 0] = 100.0  # unused rows would win every step
    for seed in range(3):
        assert isinstance(pipe.chat("hello", temperature=1.0, seed=seed, max_new_tokens=10), str)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda p: p.generate_image(""), "non-empty"),
        (lambda p: p.generate_image("x", n=0), "n must be"),
        (lambda p: p.generate_image("x", temperature=-1), "temperature"),
        (lambda p: p.generate_image("x", top_p=1.5), "top_p"),
        (lambda p: p.generate_image("x", top_k=0), "top_k"),
        (lambda p: p.generate_image("x", cfg_weight=-2), "cfg_weight"),
        (lambda p: p.generate_image("word " * 600), "too long"),
        (lambda p: p.chat("  "), "non-empty"),
        (lambda p: p.chat("hi", max_new_tokens=0), "max_new_tokens"),
        (lambda p: p.chat("word " * 600), "conversation too long"),
        (lambda p: p.chat("<image_placeholder> and <image_placeholder>", images=[Image.new("RGB", (8, 8))]), "2 <image_placeholder> but 1"),
        (lambda p: p.chat("hi", images=["/nonexistent.png"]), "nonexistent"),
    ],
)
def test_bad_arguments_give_clear_errors(pipe, call, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        call(pipe)


def test_default_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(janus.pipeline, "DEFAULT_MODEL_DIR", tmp_path / "none")
    with pytest.raises(CheckpointError, match="built-in default model is missing .*build_default_model.py"):
        janus.load(None)


def test_module_level_api_uses_janus_model_env(monkeypatch, pipe, tmp_path):
    path = save_tiny_checkpoint(tmp_path / "env")
    monkeypatch.setenv("JANUS_MODEL", str(path))
    monkeypatch.setattr(janus.pipeline, "_default", None)
    images = janus.generate_image("a red circle", seed=0)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert isinstance(janus.chat("hello", max_new_tokens=4), str)


def test_static_shape_step_compiles_without_graph_breaks_and_matches(pipe):
    """The GPU path: every step reads the whole (bucketed) cache so one compiled graph serves all
    steps. Checked here with torch.compile on CPU (CUDA graphs themselves need a GPU)."""
    prompts = [pipe.tokenizer.encode(janus.processing.chat.generation_prompt(p, pipe.cfg.roles)) for p in ("a star", "two red circles")]
    greedy = Sampling(temperature=0)
    dynamic = generate_image_codes(pipe.model, prompts, pipe.tokenizer.pad_id, 5.0, greedy)
    static = generate_image_codes(pipe.model, prompts, pipe.tokenizer.pad_id, 5.0, greedy, static_cache_reads=True)
    compiled_step = torch.compile(janus.sampling.image_step, fullgraph=True)
    compiled = generate_image_codes(
        pipe.model, prompts, pipe.tokenizer.pad_id, 5.0, greedy, step_fn=compiled_step, static_cache_reads=True
    )
    assert torch.equal(static, dynamic) and torch.equal(compiled, dynamic)


def test_chat_keeps_the_compiled_image_steps_cache_buffers(monkeypatch, tmp_path):
    """A compiled image step (a CUDA graph on GPU) reads the cache buffers it was recorded with: chat
    between two image calls must not replace them, or the graph is recorded again; nor must a smaller
    last chunk. torch.compile is stubbed out here; what is checked is which buffers the calls use."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    path = save_tiny_checkpoint(tmp_path / "tiny")
    compiled = janus.load(path, device="cpu", dtype="float32", compile=True)
    eager = janus.load(path, device="cpu", dtype="float32")
    first = compiled.generate_image_tokens(["a red circle", "a star"], seed=3)
    buffers = cache_buffers(compiled)
    answer = compiled.chat("what colour is it?", images=[Image.new("RGB", (32, 32), "red")], max_new_tokens=6)
    assert answer == eager.chat("what colour is it?", images=[Image.new("RGB", (32, 32), "red")], max_new_tokens=6)
    assert "text" not in compiled.model.decoder.caches  # chat's cache is freed after the answer
    again = compiled.generate_image_tokens(["a red circle", "a star"], seed=3)
    assert cache_buffers(compiled) == buffers
    assert torch.equal(again, first) and torch.equal(first, eager.generate_image_tokens(["a red circle", "a star"], seed=3))
    chunked = compiled.generate_image_tokens(["a red circle", "a star", "a cross"], temperature=0, batch_size=2)
    assert cache_buffers(compiled) == buffers
    assert torch.equal(chunked, eager.generate_image_tokens(["a red circle", "a star", "a cross"], temperature=0))
    assert not eager.model.decoder.caches  # without compilation no cache outlives its call


def test_a_checkpoints_guidance_scale_and_temperature_are_its_image_defaults(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "tiny")
    pipe = janus.load(path, device="cpu", dtype="float32")
    assert (pipe.default_cfg_weight, pipe.default_temperature) == (5.0, 1.0)
    (path / "generation_config.json").write_text('{"guidance_scale": 2.0, "temperature": 0.5, "top_k": 4096}')
    pipe = janus.load(path, device="cpu", dtype="float32")
    assert (pipe.default_cfg_weight, pipe.default_temperature) == (2.0, 0.5)
    codes = pipe.generate_image_tokens("a red circle", n=2, seed=0)
    assert torch.equal(codes, pipe.generate_image_tokens("a red circle", n=2, seed=0, cfg_weight=2.0, temperature=0.5))
    assert not torch.equal(codes, pipe.generate_image_tokens("a red circle", n=2, seed=0, cfg_weight=5.0))
    assert not torch.equal(codes, pipe.generate_image_tokens("a red circle", n=2, seed=0, temperature=1.0))


@pytest.mark.parametrize("text, message", [
    ("{", "generation_config.json is not valid JSON"),
    ("[2]", "generation_config.json must hold a JSON object"),
    ('{"guidance_scale": -1}', "guidance_scale must be a number >= 0, got -1"),
    ('{"guidance_scale": "high"}', "guidance_scale must be a number >= 0, got 'high'"),
    ('{"temperature": true}', "temperature must be a number >= 0, got True"),
])
def test_a_bad_generation_config_is_a_clear_error(tmp_path, text, message):
    path = save_tiny_checkpoint(tmp_path / "tiny")
    (path / "generation_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        janus.load(path, device="cpu", dtype="float32")
