"""Training: the co-training controller (trainer), the DeepSpeed learner groups, the RL math (algorithms), who
sends weights to the engines when (weight_sync), checkpoints and metrics out."""
