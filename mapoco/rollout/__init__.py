"""Rollout: the vLLM engine actors, the MAPoRL discussion they hold, its prompts and topology, and the verifiers
that score its answers."""
