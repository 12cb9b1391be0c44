"""Training: run configs, the three stages, the loop and its checkpoints."""
