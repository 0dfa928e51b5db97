"""Weight push into a live vLLM engine actor: generations change, and restoring the weights restores them."""

import pytest
import torch
from safetensors.torch import load_file

from mapoco.config import SamplingConfig
from mapoco.weight_payload import pack

pytestmark = pytest.mark.slow

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8)

def _generate(agent, prompts):
    return [g.token_ids for g in agent.engines.generate(prompts, GREEDY, [0] * len(prompts))]

def test_pushed_weights_change_generations(hetero_team):
    agent = hetero_team.agents[0]
    prompts = [agent.render([{"role": "user", "content": f"Calculate {i} + {i + 3}."}]) for i in range(6)]
    before = _generate(agent, prompts)
    original = load_file(str(agent.model_path / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.5 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                 for k, v in original.items()}
    try:
        agent.engines.push_weights(pack(perturbed, torch.float32))
        changed = _generate(agent, prompts)
    finally:
        agent.engines.push_weights(pack(original, torch.float32))
    assert changed != before
    assert _generate(agent, prompts) == before
