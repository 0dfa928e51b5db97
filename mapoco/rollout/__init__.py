"""Rollout: the vLLM engine actors, the MAPoRL discussion they hold (prompts, topology), the verifiers that score
its answers and the rewards those answers earn."""
