"""The Conductor: an RL-trained LLM that writes a workflow per question for a pool of frozen workers."""
