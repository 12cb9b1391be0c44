"""Our model against transformers' JanusForConditionalGeneration with the same random weights.

The reference is saved with save_pretrained (transformers layout) and loaded through our loader;
it is also re-written in the official layout, which must load to the identical model.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from janus.checkpoint import load_model, save_model
from janus.models.config import JanusConfig
from janus.sampling import Sampling, generate_image_codes, generate_text
from janus.testing import randomize

# Token ids of the tiny vocabulary used here (the model needs no tokenizer).
BOS, EOS, PAD, IMAGE, BOI, EOI = 0, 1, 2, 3, 4, 5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cfg = JanusConfig.preset("tiny")
    tf_cfg = transformers.JanusConfig(**cfg.to_transformers(image_token_id=IMAGE))
    torch.manual_seed(0)
    ref = transformers.JanusForConditionalGeneration(tf_cfg).eval()
    randomize(ref)
    tf_dir = tmp_path_factory.mktemp("ckpt") / "transformers"
    ref.save_pretrained(tf_dir)
    ours = load_model(tf_dir, device="cpu", dtype="float32")
    official_dir = save_model(ours, tf_dir.parent / "official", "official")
    return ref, ours, load_model(official_dir, device="cpu", dtype="float32")


def understanding_prompt(cfg: JanusConfig) -> torch.Tensor:
    n = cfg.vision.num_patches
    return torch.tensor([[BOS, 40, 41, 42, BOI] + [IMAGE] * n + [EOI, 43, 44, 45, 46]])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_text_logits_match_reference(checkpoints):
    ref, ours, official = checkpoints
    tokens = understanding_prompt(ours.cfg)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(input_ids=tokens, pixel_values=pixels).logits
        for model in (ours, official):
            got = model.text_logits(model(tokens, image_mask=tokens == IMAGE, pixels=pixels))
            assert relative_error(got, expected) <= 1e-4


def test_greedy_answer_matches_reference(checkpoints):
    ref, ours, official = checkpoints
    tokens = understanding_prompt(ours.cfg)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref.generation_config.eos_token_id = None  # compare a full 24 tokens, no early stop
    expected = ref.generate(input_ids=tokens, pixel_values=pixels, max_new_tokens=24, do_sample=False)
    expected = expected[0, tokens.shape[1]:].tolist()
    assert len(expected) == 24
    for model in (ours, official):
        got = list(generate_text(model, tokens, tokens == IMAGE, pixels, 24, None, Sampling(temperature=0)))
        assert got == expected
    assert len(set(expected)) > 5  # a varied answer, not one repeated token


def test_image_logits_and_greedy_cfg_tokens_match_reference(checkpoints):
    ref, ours, official = checkpoints
    prompt = [BOS, 50, 51, 52, 53, 54, BOI]
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        expected = ref.model.generation_head(ref.model(input_ids=tokens).last_hidden_state)
        got = ours.image_logits(ours(tokens))
    assert relative_error(got, expected) <= 1e-4

    ref.generation_config.pad_token_id = PAD
    ref.generation_config.bos_token_id = BOS
    ref.generation_config.generation_kwargs = {"boi_token_id": BOI}
    expected_codes = ref.generate(
        tokens, generation_mode="image", do_sample=False, guidance_scale=5.0, attention_mask=torch.ones_like(tokens)
    )
    for model in (ours, official):
        codes = generate_image_codes(model, [prompt], PAD, cfg_weight=5.0, sampling=Sampling(temperature=0))
        assert codes.tolist() == expected_codes.tolist()
    assert len(set(expected_codes[0].tolist())) > 5


def test_vq_decode_matches_reference(checkpoints):
    ref, ours, official = checkpoints
    codes = torch.randint(0, ours.cfg.vq.codebook_size, (2, ours.cfg.vq.num_tokens), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.model.vqmodel.decode(codes)
        for model in (ours, official):
            assert relative_error(model.vq.decode(codes), expected) <= 1e-5


def test_official_layout_is_identical(checkpoints):
    _, ours, official = checkpoints
    a, b = ours.state_dict(), official.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
