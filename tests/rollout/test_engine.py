"""Weight push into a live vLLM engine actor: generations change, and restoring the weights restores them."""

import pytest
import torch
from safetensors.torch import load_file

from mapoco.config import SamplingConfig
from mapoco.weights.payload import pack

pytestmark = pytest.mark.slow

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8)

def _generate(agent, prompts):
    return [g.token_ids for g in agent.engines.generate(prompts, GREEDY, [0] * len(prompts))]

def test_pushed_weights_change_generations(hetero_team):
    agent = hetero_team.agents[0]
    prompts = [agent.render([{"role": "user", "content": f"Calculate {i} + {i + 3}."}]) for i in range(6)]
    original = load_file(str(agent.model_path / "model.safetensors"))
    agent.engines.push_weights(pack(original, torch.float32))  # the shared engines may hold another test's weights
    before = _generate(agent, prompts)
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


def test_engine_logprobs_follow_pushed_weights_including_a_tied_embedding(hetero_team):
    """The learner's and the engine's logprobs of the same tokens agree after a push that changes the embedding,
    which tied models also use as the output head (vLLM's reload used to leave the head's CPU copy stale)."""
    from transformers import AutoModelForCausalLM

    agent = hetero_team.agents[0]
    model = AutoModelForCausalLM.from_pretrained(agent.model_path, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    original = load_file(str(agent.model_path / "model.safetensors"))
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.add_(0.05 * torch.randn(embedding.shape, generator=torch.Generator().manual_seed(1)))
    pushed = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    prompt = agent.render([{"role": "user", "content": "Calculate 3 + 4."}])
    try:
        agent.engines.push_weights(pack(pushed, torch.float32))
        out = agent.engines.generate([prompt], SamplingConfig(temperature=1.0, max_new_tokens=12), [3])[0]
    finally:
        agent.engines.push_weights(pack(original, torch.float32))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + out.token_ids])).logits[0, :-1], -1)
    learner = [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert max(abs(a - b) for a, b in zip(learner, out.logprobs)) < 1e-3


@pytest.mark.parametrize("agent_index", [0, 1])
def test_engine_scores_the_tokens_it_sampled_as_it_sampled_them(hetero_team, agent_index):
    """`score` (prompt logprobs of prompt + response) is the sync check of an overlapped run: on the engine's own
    samples it must give their sampling logprobs, token by token."""
    agent = hetero_team.agents[agent_index]
    prompts = [agent.render([{"role": "user", "content": f"Calculate {i} * {i + 2}."}]) for i in range(3)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    generations = agent.engines.generate(prompts, sampling, [7, 8, 9])
    (scores,) = agent.engines.logprobs([(g.prompt_ids, g.token_ids) for g in generations])
    assert [len(s) for s in scores] == [len(g.token_ids) for g in generations]
    gaps = [abs(a - b) for g, s in zip(generations, scores) for a, b in zip(g.logprobs, s)]
    assert max(gaps) < 1e-3 and min(min(g.logprobs) for g in generations) < -0.1  # sampled, not all near-certain


def test_the_kv_cache_holds_the_tokens_mapoco_plan_counts(hetero_team):
    """A CPU engine's KV cache is engine.kv_cache_gib large: vLLM made room for the tokens `mapoco plan` counts in
    that much memory (the same per-token arithmetic it applies to a GPU's rest after the weights)."""
    from mapoco.planning.plan import kv_cache_tokens

    for agent in hetero_team.agents:
        (described,) = agent.engines.call_all("describe")
        engine = agent.cfg.engine
        assert described["kv_cache_tokens"] == kv_cache_tokens(agent.cfg.model, described["dtype"],
                                                                 engine.tensor_parallel_size, engine.kv_cache_gib) > 0
