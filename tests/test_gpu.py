"""CUDA-only checks of inference: flash-attn against SDPA, the compiled CUDA-graph image step, bf16.

They skip without a GPU (CI has none); run them on one with `python -m pytest -q tests/test_gpu.py`.
The other test files also run on a GPU machine: the training tests then train on CUDA in bf16, and
`tests/test_train.py` has a CUDA-only check of bf16 training beside its CPU twin.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import janus
from janus.checkpoint import load_model
from janus.models.attention import Documents, _flash_supports, attention, flash_attn_func
from janus.testing import cache_buffers, save_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ["a red circle", "two blue squares above a green star"]


@pytest.mark.skipif(flash_attn_func is None, reason="flash-attn is not installed")
def test_flash_attention_matches_sdpa_causal_and_packed():
    if not _flash_supports(torch.cuda.current_device()):
        pytest.skip("flash-attn 2 needs compute capability 8 or newer")
    torch.manual_seed(0)
    q = torch.randn(2, 8, 96, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 96, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))  # grouped KV heads
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attention(q, k, v, None).float(), reference, atol=2e-2, rtol=2e-2)
    # Packed rows: two documents then padding, and three documents; the varlen kernel against the dense mask.
    doc_ids = torch.tensor([[0] * 40 + [1] * 30 + [-1] * 26, [0] * 10 + [1] * 50 + [2] * 36], device="cuda")
    docs = Documents(doc_ids)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=docs.mask, enable_gqa=True)
    real = (doc_ids >= 0)[:, None, :, None].expand_as(reference)  # padding attends differently, and takes no loss
    torch.testing.assert_close(attention(q, k, v, docs).float()[real], reference[real], atol=2e-2, rtol=2e-2)


def test_cuda_forward_matches_cpu_in_float32(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "tiny")
    cpu, gpu = load_model(path, "cpu", "float32"), load_model(path, "cuda", "float32")
    ids = torch.randint(0, cpu.cfg.decoder.vocab_size, (2, 40))
    with torch.no_grad():
        expected = cpu.text_logits(cpu(ids))
        actual = gpu.text_logits(gpu(ids.cuda())).cpu()
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_compiled_step_matches_eager_and_keeps_its_buffers_across_chat(tmp_path):
    """The default on CUDA: the image step compiled with mode="reduce-overhead" (CUDA graphs). Its
    greedy codes equal the eager step's, and a chat between two image calls leaves the buffers the
    graphs were recorded with in place."""
    path = save_tiny_checkpoint(tmp_path / "tiny")
    eager = janus.load(path, device="cuda", dtype="float32", compile=False)
    compiled = janus.load(path, device="cuda", dtype="float32")
    assert compiled.compiled and not eager.compiled
    first = compiled.generate_image_tokens(PROMPTS, temperature=0)
    buffers = cache_buffers(compiled)
    assert torch.equal(first, eager.generate_image_tokens(PROMPTS, temperature=0))
    answer = compiled.chat("what colour is it?", images=[Image.new("RGB", (32, 32), "red")], max_new_tokens=6)
    assert answer == eager.chat("what colour is it?", images=[Image.new("RGB", (32, 32), "red")], max_new_tokens=6)
    assert torch.equal(compiled.generate_image_tokens(PROMPTS, temperature=0), first)
    assert cache_buffers(compiled) == buffers
    sampled = [compiled.generate_image_tokens(PROMPTS, n=2, seed=s) for s in (5, 5, 6)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])


def test_bf16_generation_gives_valid_codes_and_images(tmp_path):
    pipe = janus.load(save_tiny_checkpoint(tmp_path / "tiny"), device="cuda")  # auto: bf16 on CUDA
    assert pipe.model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    codes = pipe.generate_image_tokens(PROMPTS, n=3, seed=0)
    assert codes.shape == (6, pipe.cfg.vq.num_tokens) and 0 <= int(codes.min()) and int(codes.max()) < pipe.cfg.vq.codebook_size
    images = pipe.decode_image_tokens(codes)
    assert len(images) == 6 and images[0].size == (pipe.cfg.vq.image_size,) * 2

