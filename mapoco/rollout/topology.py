"""Who sees whom in a discussion (``discussion.topology``): the prompts and the incentives follow the same map."""

from __future__ import annotations


def visible_peers(agent: int, num_agents: int, topology: str) -> list[int]:
    """Whose previous answers ``agent`` sees (config.schema.TOPOLOGIES names them). ring: the previous agent;
    star: agent 0 is the hub; all_to_all: every other agent."""
    others = [j for j in range(num_agents) if j != agent]
    if topology == "ring":
        return others and [(agent - 1) % num_agents]
    if topology == "star":
        return others if agent == 0 else [0]
    return others


def audience(agent: int, num_agents: int, topology: str) -> list[int]:
    """Who sees ``agent``'s answers at the next turn."""
    return [j for j in range(num_agents) if agent in visible_peers(j, num_agents, topology)]
