"""Training throughput (tokens/s, MFU) of stage 2 through the real entry point, with packing.

A random-weight model of the chosen preset starts the run; the data is the toy data set. The first
steps (warm-up, allocator) are dropped; the median of the rest is reported.

    python bench/bench_train.py                                   # CPU, the tiny preset
    python bench/bench_train.py --preset janus-pro-1b --seq-len 4096 --micro-batch 2 --steps 12   # one GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def make_start(root: Path, preset: str) -> None:
    from janus.checkpoint import save_model
    from janus.models.config import JanusConfig
    from janus.models.unified import JanusModel
    from janus.testing import make_tiny_run, save_tiny_tokenizer

    make_tiny_run(root)
    if preset != "tiny":
        model = JanusModel(JanusConfig.preset(preset))
        start = root / "stage1" / "export"
        with tempfile.TemporaryDirectory() as tok:
            save_tiny_tokenizer(tok)
            save_model(model.to(torch.bfloat16), start, "native", extra_files_from=tok, image_token_id=3)
    else:
        (root / "stage1").mkdir()
        (root / "stage1" / "export").symlink_to((root / "stage0" / "export").resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--zero", type=int, default=0, help="ZeRO stage")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--prefetch-rows", type=int, default=16, help="rows built ahead in a thread (0: between steps)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        make_start(root, args.preset)
        cmd = [
            sys.executable, "stages/stage2_pretrain.py", "--config", "configs/tiny.yaml",
            "--set", f"root={root}", "--set", f"data.seq_len={args.seq_len}", "--set", f"train.steps={args.steps}",
            "--set", f"train.micro_batch_size={args.micro_batch}", "--set", "train.grad_accum=1",
            "--set", f"train.activation_checkpointing={str(args.checkpointing).lower()}", "--set", f"data.prefetch_rows={args.prefetch_rows}",
            "--set", f"checkpoint.every={args.steps + 1}", "--set", f"deepspeed={{zero_optimization: {{stage: {args.zero}}}}}",
        ]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-4000:])
        records = [json.loads(line) for line in (root / "stage2" / "metrics.jsonl").read_text().splitlines()]
    steady = records[2:] or records
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    mfus = [r["mfu"] for r in steady if r["mfu"] is not None]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    result = {
        "device": device, "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "zero": args.zero, "activation_checkpointing": args.checkpointing, "prefetch_rows": args.prefetch_rows, "steps": args.steps,
        "tokens_per_s": tokens_per_s, "mfu": statistics.median(mfus) if mfus else None,
        "precision": "bf16" if torch.cuda.is_available() else "fp32", "torch": torch.__version__,
    }
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train-{'cuda' if torch.cuda.is_available() else 'cpu'}-{args.preset}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (no known peak on this device)"
    print(f"{device} | {args.preset} stage 2, seq {args.seq_len} x {args.micro_batch}, ZeRO-{args.zero}, {result['precision']}, prefetch {args.prefetch_rows} rows")
    print(f"tokens/s {tokens_per_s:,.0f} | MFU {mfu}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
