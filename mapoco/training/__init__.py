"""Training: the co-training controller (trainer), the DeepSpeed learner groups, the RL math (algorithms, rewards),
weight movement to the engines, checkpoints and metrics out."""
