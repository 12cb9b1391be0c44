"""Image-token generation: janus's sampler against transformers' Janus `generate(generation_mode="image")`.

Both run the same random weights (a transformers checkpoint loaded by janus). Each case runs in a fresh
process so its peak memory is its own. Reported per case: images/s, time per image-token step, peak
memory, the speed-up over transformers, and the memory-bandwidth floor (bytes of weights and KV cache
read per step over the measured copy bandwidth). VQ decoding is excluded on both sides (same code).

    python bench/bench_generate.py                      # CPU: 576-token model, 256 wide, 4 layers; n = 1, 4;
                                                        # janus eager and compiled (janus.load(compile=True))
    python bench/bench_generate.py --device cuda --preset janus-pro-1b --n 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT_LEN = 24
CPU_MODEL = dict(
    decoder=dict(vocab_size=102400, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, intermediate_size=688, max_seq_len=1024),
    vision=dict(image_size=384, patch_size=16, width=64, depth=1, num_heads=2),
    vq=dict(image_size=384, codebook_size=16384, codebook_dim=8, z_channels=64, base_channels=32, channel_mult=[1, 1, 2, 2, 4], num_res_blocks=1),
)


def model_config(preset: str | None):
    from janus.models.config import JanusConfig

    return JanusConfig.preset(preset) if preset else JanusConfig.from_dict(CPU_MODEL)


def prepare_checkpoint(preset: str | None, dtype: torch.dtype, path: Path) -> None:
    import transformers

    from janus.testing import randomize

    cfg = model_config(preset)
    tf_cfg = transformers.JanusConfig(**cfg.to_transformers(image_token_id=3))
    with torch.device("cpu"):
        ref = transformers.JanusForConditionalGeneration(tf_cfg).to(dtype)
    randomize(ref)
    ref.save_pretrained(path)


def measure_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device copy (read + write)."""
    x = torch.empty(64 << 20, dtype=torch.float32, device=device)  # 256 MiB
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    sync(device)
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 4 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_bytes(cfg, dtype: torch.dtype, rows: int, avg_len: float) -> float:
    """Bytes one image-token step must read: decoder, gen adaptor and image head weights, plus the KV cache."""
    d = cfg.decoder
    size = torch.finfo(dtype).bits // 8
    layer = d.dim * (d.n_heads * d.head_dim) * 2 + 2 * d.dim * d.n_kv_heads * d.head_dim + 3 * d.dim * d.intermediate_size
    weights = d.n_layers * layer + (d.dim * d.dim + d.dim * cfg.vq.codebook_size) + (cfg.vq.codebook_dim * d.dim + d.dim * d.dim)
    kv = rows * d.n_layers * 2 * d.n_kv_heads * d.head_dim * avg_len
    return (weights + kv) * size


def peak_rss() -> int:
    """Peak resident bytes since the last reset (VmHWM)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def run_case(impl: str, path: Path, n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Time `repeats` generations of n images for one prompt, after one warm-up."""
    from janus.checkpoint import load_model

    torch.manual_seed(0)
    prompt = [0] + torch.randint(10, 100, (PROMPT_LEN - 2,)).tolist() + [4]
    if impl.startswith("janus"):
        from janus.sampling import Sampling, generate_image_codes, image_step

        model = load_model(path, device, dtype)
        compiled = device.type == "cuda" or impl == "janus-compiled"
        step = torch.compile(image_step, mode="reduce-overhead", fullgraph=True) if compiled else image_step
        generator = torch.Generator(device).manual_seed(0)

        def generate():
            return generate_image_codes(model, [prompt] * n, 2, 5.0, Sampling(1.0), generator, step, compiled)
    else:
        import transformers

        model = transformers.JanusForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        gc = model.generation_config
        gc.pad_token_id, gc.bos_token_id, gc.generation_kwargs = 2, 0, {"boi_token_id": 4}
        ids = torch.tensor([prompt], device=device)

        def generate():
            with torch.no_grad():
                return model.generate(
                    ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=True,
                    guidance_scale=5.0, num_return_sequences=n,
                )
    codes = generate()
    if codes.shape[0] != n:
        raise RuntimeError(f"{impl} returned {codes.shape[0]} images, expected {n}")
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS: measure generation, not loading
    t = time.perf_counter()
    for _ in range(repeats):
        generate()
    sync(device)
    seconds = (time.perf_counter() - t) / repeats
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    return {"impl": impl, "n": n, "seconds": seconds, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None, help="model size preset (default: the small CPU model)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4], help="images per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "N", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    if args.case:  # a child process: one measurement, printed as JSON
        impl, n, ckpt = args.case
        print(json.dumps(run_case(impl, Path(ckpt), int(n), device, dtype, args.repeats)))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"ckpt-{args.preset or 'cpu-small'}"
    if not (ckpt / "config.json").is_file():
        prepare_checkpoint(args.preset, dtype, ckpt)
    cfg = model_config(args.preset)
    bandwidth = measure_bandwidth(device)
    rows = []
    for n in args.n:
        result = {}
        # On CPU the compiled step is optional (it needs a C++ compiler), so both are measured.
        for impl in ("janus", "janus-compiled", "transformers") if device.type == "cpu" else ("janus", "transformers"):
            cmd = [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats), "--case", impl, str(n), str(ckpt)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{impl} n={n} failed:\n{proc.stderr[-3000:]}")
            result[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
        steps = cfg.vq.num_tokens
        avg_len = PROMPT_LEN + steps / 2
        floor = step_bytes(cfg, dtype, 2 * n, avg_len) / bandwidth
        for impl, r in result.items():
            rows.append({
                "impl": impl, "n": n, "images_per_s": n / r["seconds"], "ms_per_step": 1e3 * r["seconds"] / steps,
                "peak_mib": r["peak_bytes"] / 2**20, "floor_ms_per_step": 1e3 * floor,
                "x_floor": r["seconds"] / steps / floor,
                "speedup_vs_transformers": result["transformers"]["seconds"] / r["seconds"],
            })
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report = {"device": machine, "preset": args.preset or "cpu-small (576 tokens, 256 wide, 4 layers)",
              "dtype": str(dtype), "bandwidth_gb_s": bandwidth / 1e9, "torch": torch.__version__, "rows": rows}
    name = f"generate-{device.type}-{args.preset or 'cpu-small'}.json"
    (out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{machine}, {report['preset']}, {dtype}, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'impl':<16}{'n':>3}{'img/s':>9}{'ms/step':>9}{'peak MiB':>10}{'floor ms':>10}{'x floor':>9}{'speed-up':>10}")
    for r in rows:
        print(f"{r['impl']:<16}{r['n']:>3}{r['images_per_s']:>9.3f}{r['ms_per_step']:>9.2f}{r['peak_mib']:>10.0f}"
              f"{r['floor_ms_per_step']:>10.3f}{r['x_floor']:>9.1f}{r['speedup_vs_transformers']:>10.2f}")
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
