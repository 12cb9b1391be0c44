"""Stage 3 (supervised fine-tuning: also the SigLIP encoder).

    deepspeed stages/stage3_sft.py --config configs/RUN.yaml     # any number of GPUs / nodes
    python stages/stage3_sft.py --config configs/RUN.yaml        # one process (CPU or one GPU)
"""

from janus.train.loop import main

if __name__ == "__main__":
    main(stage=3)
