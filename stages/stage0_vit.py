"""Stage 0: pretrain the understanding encoder on the shapes world's exact patch labels.

    python stages/stage0_vit.py --config configs/default/vit.yaml [--set steps=3000]
"""

import argparse

from janus.train.config import load_flat_config
from janus.train.vit import ViTRunConfig, train_vit

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Janus stage 0: understanding-encoder pretraining (shapes world)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args()
    metrics = train_vit(load_flat_config(ViTRunConfig, args.config, args.set))
    print(f"held-out object patches: shape {metrics['shape_accuracy']:.1%}, colour {metrics['colour_accuracy']:.1%}")
