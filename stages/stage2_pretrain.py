"""Stage 2 (unified pretraining: everything but the two encoders).

    deepspeed stages/stage2_pretrain.py --config configs/RUN.yaml     # any number of GPUs / nodes
    python stages/stage2_pretrain.py --config configs/RUN.yaml        # one process (CPU or one GPU)
"""

from janus.train.loop import main

if __name__ == "__main__":
    main(stage=2)
