"""Stage 0: train the VQ image tokenizer (reconstruction, codebook and commitment losses).

    python stages/stage0_vq.py --config configs/default/vq.yaml [--set steps=4000]
"""

import argparse

from janus.train.config import load_flat_config
from janus.train.vq import VQRunConfig, train_vq

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Janus stage 0: VQ tokenizer training")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args()
    metrics = train_vq(load_flat_config(VQRunConfig, args.config, args.set))
    print(f"held-out PSNR {metrics['psnr']:.2f} dB, codebook usage {metrics['codebook_usage']:.1%}")
