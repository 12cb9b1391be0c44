"""Stage 1 (adaptors and image head).

    deepspeed stages/stage1_adaptors.py --config configs/RUN.yaml     # any number of GPUs / nodes
    python stages/stage1_adaptors.py --config configs/RUN.yaml        # one process (CPU or one GPU)
"""

from janus.train.loop import main

if __name__ == "__main__":
    main(stage=1)
