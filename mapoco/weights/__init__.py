"""Weight movement: how a trained policy's weights reach its engines, after each update and from a checkpoint.

- ``payload``: the object-store form of a set of tensors, and a policy's tensors under the engine's names.
- ``sync``: the interface every transport implements (``WeightSync``: ``updating``, ``push``, ``shutdown``) and what it
  needs of a learner group and of an agent's engines; ``factory.make_sync`` picks the transport for an agent.
- one module per transport, each with its engine-side functions (run inside vLLM's workers): ``object_store``
  (learner rank 0 writes the weights into Ray's object store once; every engine reads them in place and reloads),
  ``collective`` (one broadcast group per agent: NCCL on GPUs, gloo on CPUs, one code path), ``adapters`` (the
  shared LoRA engine: only an agent's adapter moves).
- ``reload``: the engine's in-place reload every transport ends in; ``checkpoint``: a checkpointed policy into
  engines (``mapoco serve``, ``mapoco eval`` of a run).
"""
