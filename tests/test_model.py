"""The unified model's mixed-sequence embedding and training loss, and the loader's memory use."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F
import transformers

from janus.checkpoint import load_model, save_model
from janus.models.config import JanusConfig
from janus.models.unified import IGNORE, JanusModel
from janus.testing import randomize


def tiny_model() -> JanusModel:
    model = JanusModel(JanusConfig.preset("tiny")).eval()
    randomize(model)
    return model


def test_text_loss_equals_transformers_loss(tmp_path):
    cfg = JanusConfig.preset("tiny")
    ref = transformers.JanusForConditionalGeneration(transformers.JanusConfig(**cfg.to_transformers(image_token_id=3)))
    randomize(ref)
    ref.save_pretrained(tmp_path / "tf")
    ours = load_model(tmp_path / "tf", "cpu")
    tokens = torch.randint(6, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[0, :5] = IGNORE  # e.g. a prompt that takes no loss
    with torch.no_grad():
        expected = ref(input_ids=tokens, labels=labels).loss
        targets = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE)], dim=1)  # position t predicts t + 1
        out = ours.loss(ours(tokens), targets, torch.zeros_like(targets, dtype=torch.bool))
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    assert torch.allclose(out.text_loss, expected, rtol=1e-5)
    assert out.text_count == 2 * 11 - 4 and out.image_count == 0 and out.image_loss == 0


def test_generation_sequence_loss_uses_the_image_head_and_code_embeddings():
    model = tiny_model()
    prompt = torch.tensor([0, 20, 21, 22, 4])  # BOS text BOI
    codes = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(1))
    tokens = torch.cat([prompt, codes])[None]
    code_mask = torch.zeros_like(tokens, dtype=torch.bool)
    code_mask[0, 5:] = True
    h = model.embed(tokens, code_mask=code_mask)
    assert torch.equal(h[0, 5:], model.embed_image_codes(codes))
    assert torch.equal(h[0, :5], model.decoder.embed_tokens(prompt))

    targets = torch.full_like(tokens, IGNORE)
    targets[0, 4:-1] = codes  # BOI predicts the first code, each code the next
    target_is_code = targets != IGNORE
    hidden = model(tokens, code_mask=code_mask)
    out = model.loss(hidden, targets, target_is_code)
    manual = F.cross_entropy(model.image_logits(hidden[0, 4:-1]), codes)
    assert torch.allclose(out.image_loss, manual, rtol=1e-5) and torch.allclose(out.loss, manual, rtol=1e-5)
    assert out.image_count == 16 and out.text_count == 0
    out.loss.backward()
    for module in (model.gen_embed, model.gen_adaptor, model.gen_head, model.decoder.layers[0]):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert model.decoder.lm_head.weight.grad is None  # the text head is not run for image targets


def test_mixed_text_and_image_targets_are_reported_separately():
    model = tiny_model()
    tokens = torch.randint(6, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(6, 64, (1, 10), generator=torch.Generator().manual_seed(3))
    is_code = torch.tensor([[False] * 4 + [True] * 6])
    targets[0, 0] = IGNORE
    with torch.no_grad():
        hidden = model(tokens)
        out = model.loss(hidden, targets, is_code)
        text = F.cross_entropy(model.text_logits(hidden[0, 1:4]), targets[0, 1:4], reduction="sum")
        image = F.cross_entropy(model.image_logits(hidden[0, 4:]), targets[0, 4:], reduction="sum")
    assert torch.allclose(out.text_loss, text / 3) and torch.allclose(out.image_loss, image / 6)
    assert torch.allclose(out.loss, (text + image) / 9)


def test_loading_does_not_hold_two_copies(tmp_path):
    """Peak memory while loading stays well under twice the weights' size."""
    cfg = JanusConfig.from_dict({
        "decoder": {"vocab_size": 32000, "dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "intermediate_size": 1536},
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
        "vq": {"image_size": 32, "codebook_size": 64, "z_channels": 32, "base_channels": 32, "channel_mult": [1, 1, 2, 2], "num_res_blocks": 1},
    })
    model = JanusModel(cfg)
    weights = sum(t.numel() * 4 for t in model.state_dict().values())  # as loaded: float32
    # Stored in bf16 and loaded as float32, so every tensor is really converted (an fp32 file loads as
    # copy-on-write views of the mapped file and would take almost no memory at all).
    save_model(model.to(torch.bfloat16), tmp_path / "ckpt", "official")
    del model
    # Anonymous memory only: pages of the memory-mapped weight files also count in RSS while mapped,
    # but they are the page cache (shared, reclaimable), not a second copy.
    script = textwrap.dedent(f"""
        import threading, time, janus.checkpoint as c
        def anon():
            line = [l for l in open('/proc/self/status') if l.startswith('RssAnon')][0]
            return int(line.split()[1]) * 1024
        before, peak, done = anon(), [0], threading.Event()
        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], anon())
                time.sleep(0.001)
        thread = threading.Thread(target=watch)
        thread.start()
        model = c.load_model({str(tmp_path / 'ckpt')!r}, 'cpu', 'float32')
        done.set(); thread.join()
        print(before, max(peak[0], anon()))
    """)
    before, peak = map(int, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split())
    assert weights > 100e6
    assert 0.9 * weights < peak - before < 1.25 * weights, (peak - before) / weights


def test_decode_sized_linear_matches_f_linear():
    """The few-row CPU path of janus.models.linear.Linear (W @ x.T, one row padded to two; inference
    only) computes what F.linear computes, for every row count around its limit, with and without bias."""
    from janus.models.linear import DECODE_ROWS, Linear

    torch.manual_seed(0)
    for bias in (False, True):
        layer = Linear(48, 80, bias=bias)
        for shape in ((48,), (1, 1, 48), (2, 1, 48), (3, 5, 48), (DECODE_ROWS, 48), (DECODE_ROWS + 1, 48)):
            x = torch.randn(shape)
            with torch.no_grad():
                out = layer(x)
            assert out.shape == (*shape[:-1], 80) and out.is_contiguous()
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    # With gradients enabled it is F.linear, so training is unaffected.
    x = torch.randn(2, 48, requires_grad=True)
    layer(x).square().sum().backward()
    expected = torch.autograd.grad(F.linear(x, layer.weight, layer.bias).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
