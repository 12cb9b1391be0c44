"""VQ tokenizer: parity with transformers' JanusVQVAE on tiny random weights; quantiser, losses, input checks."""

import re

import pytest
import torch
import torch.nn.functional as F
from transformers.models.janus.configuration_janus import JanusVQVAEConfig
from transformers.models.janus.modeling_janus import JanusVQVAE

from janus.models.config import VQConfig
from janus.models.vq import VQModel, VQOutput

TINY = dict(z_channels=32, base_channels=32)
TINY_4_LEVELS = VQConfig(image_size=32, codebook_size=64, codebook_dim=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, **TINY)
TINY_3_LEVELS = VQConfig(image_size=16, codebook_size=32, codebook_dim=4, channel_mult=(1, 2, 2), num_res_blocks=2, **TINY)
CONFIGS = pytest.mark.parametrize("cfg", [TINY_4_LEVELS, TINY_3_LEVELS], ids=["4levels", "3levels"])


def random_model(cfg: VQConfig, seed: int = 0) -> VQModel:
    """A VQModel whose GroupNorm affines are random too, so swapped norms cannot go unnoticed."""
    torch.manual_seed(seed)
    model = VQModel(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def official_to_transformers(key: str) -> str:
    """Official LlamaGen/Janus VQ key -> transformers JanusVQVAE key."""
    key = re.sub(r"^encoder\.conv_blocks\.", "encoder.down.", key)
    key = re.sub(r"^decoder\.conv_blocks\.", "decoder.up.", key)
    key = key.replace(".res.", ".block.")
    for i, name in enumerate(("block_1", "attn_1", "block_2")):
        key = key.replace(f".mid.{i}.", f".mid.{name}.")
    return key


def transformers_twin(model: VQModel) -> JanusVQVAE:
    cfg = model.cfg
    hf_cfg = JanusVQVAEConfig(
        embed_dim=cfg.codebook_dim,
        num_embeddings=cfg.codebook_size,
        latent_channels=cfg.z_channels,
        base_channels=cfg.base_channels,
        channel_multiplier=list(cfg.channel_mult),
        num_res_blocks=cfg.num_res_blocks,
        num_patches=cfg.grid_size,  # transformers' name for the grid side, not the token count
    )
    hf = JanusVQVAE(hf_cfg)
    hf.load_state_dict({official_to_transformers(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf.eval()


def random_pixels(cfg: VQConfig, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1


def test_official_parameter_names():
    keys = set(random_model(TINY_4_LEVELS).state_dict())
    for key in [
        "encoder.conv_in.weight",
        "encoder.conv_blocks.0.res.0.norm1.weight",
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight",  # 32 -> 64 channels
        "encoder.conv_blocks.0.downsample.conv.weight",
        "encoder.conv_blocks.3.attn.0.proj_out.weight",
        "encoder.mid.1.q.weight",
        "encoder.mid.2.conv2.bias",
        "quant_conv.weight",
        "quantize.embedding.weight",
        "post_quant_conv.weight",
        "decoder.conv_blocks.0.attn.1.k.weight",  # decoder: num_res_blocks + 1 blocks per level
        "decoder.conv_blocks.2.res.0.nin_shortcut.weight",  # 64 -> 32 channels
        "decoder.conv_blocks.2.upsample.conv.weight",
        "decoder.norm_out.weight",
    ]:
        assert key in keys, key
    assert not any("codebook_used" in k for k in keys)
    assert "encoder.conv_blocks.3.downsample.conv.weight" not in keys  # lowest resolution: no downsampling
    assert "decoder.conv_blocks.3.upsample.conv.weight" not in keys  # highest resolution: no upsampling
    assert not any(k.startswith("encoder.conv_blocks.0.attn") for k in keys)  # attention only at the lowest


@CONFIGS
def test_decode_matches_transformers(cfg):
    model = random_model(cfg)
    hf = transformers_twin(model)
    codes = torch.randint(0, cfg.codebook_size, (3, cfg.num_tokens), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model.decode(codes), hf.decode(codes)
    assert ours.shape == (3, 3, cfg.image_size, cfg.image_size)
    assert ours.abs().max() > 1e-2  # not a degenerate all-zero output
    # Not bit-exact: F.silu and SDPA round differently from x * sigmoid(x) and bmm-softmax (~5e-6 here).
    assert (ours - theirs).abs().max().item() <= 1e-5


@CONFIGS
def test_prequant_latents_match_transformers(cfg):
    model = random_model(cfg)
    hf = transformers_twin(model)
    x = random_pixels(cfg)
    with torch.no_grad():
        ours = model.quant_conv(model.encoder(x))
        theirs = hf.quant_conv(hf.encoder(x))
    assert ours.shape == (2, cfg.codebook_dim, cfg.grid_size, cfg.grid_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@CONFIGS
def test_encode_picks_nearest_normalised_entry(cfg):
    model = random_model(cfg)
    x = random_pixels(cfg, batch=3)
    codes = model.encode(x)
    assert codes.shape == (3, cfg.num_tokens) and codes.dtype == torch.long

    # Brute force: unit-norm latents in row-major grid order against the unit-norm codebook.
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x))
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(3, cfg.num_tokens, cfg.codebook_dim), dim=-1)
    book = F.normalize(model.quantize.embedding.weight.detach(), dim=-1)
    dist = ((z[:, :, None, :] - book[None, None]) ** 2).sum(-1)  # [B, N, K]
    assert torch.equal(codes, dist.argmin(-1))
    assert len(codes.unique()) > 1  # the check above is not trivially about one code

    recon = model.decode(codes)
    assert recon.shape == x.shape and recon.dtype == torch.float32


def test_training_forward_losses_and_straight_through():
    cfg = TINY_4_LEVELS
    model = random_model(cfg).train()
    x = random_pixels(cfg)
    out = model(x)
    assert isinstance(out, VQOutput)
    assert out.reconstruction.shape == x.shape
    assert torch.equal(out.codes, model.encode(x))
    for loss in (out.codebook_loss, out.commitment_loss):
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    # Both compare the unit-norm latent with its unit-norm entry ...
    with torch.no_grad():
        z = F.normalize(model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).flatten(1, 2), dim=-1)
        entries = F.normalize(model.quantize.embedding.weight[out.codes], dim=-1)
    torch.testing.assert_close(out.codebook_loss, ((z - entries) ** 2).mean())
    # ... on different stop-gradient sides, so their values differ only by beta.
    torch.testing.assert_close(out.commitment_loss, cfg.commit_beta * out.codebook_loss)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return model.encoder.conv_in.weight.grad, model.quantize.embedding.weight.grad

    # Reconstruction reaches the encoder only through the straight-through estimator; not the codebook.
    enc, book = grads(F.mse_loss(out.reconstruction, x))
    assert enc is not None and enc.abs().sum() > 0 and book is None
    # Codebook loss trains only the codebook, commitment only the encoder.
    enc, book = grads(out.codebook_loss)
    assert enc is None and book.abs().sum() > 0
    enc, book = grads(out.commitment_loss)
    assert enc.abs().sum() > 0 and book is None


def test_bad_inputs_raise_helpful_errors():
    cfg = TINY_4_LEVELS
    model = random_model(cfg)
    for shape in [(3, 32, 32), (1, 3, 16, 16), (1, 1, 32, 32), (1, 3, 32, 31)]:
        with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
            model.encode(torch.zeros(shape))
        with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
            model(torch.zeros(shape))
    n = cfg.num_tokens
    for shape in [(n,), (1, n + 1), (1, 2, n)]:
        with pytest.raises(ValueError, match=rf"\[B, {n}\]"):
            model.decode(torch.zeros(shape, dtype=torch.long))
    for bad in (-1, cfg.codebook_size):
        codes = torch.zeros(2, n, dtype=torch.long)
        codes[1, 5] = bad
        with pytest.raises(ValueError, match=rf"\[0, {cfg.codebook_size}\)"):
            model.decode(codes)
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, n))
