"""Placement groups: each agent's engines in bundles of their own; runs that cannot fit fail with the numbers."""

import pytest
import ray
from ray.util.placement_group import placement_group_table

from mapoco.cluster import init_ray
from mapoco.config import ConfigError
from mapoco.placement import check_bundles_fit, reserve

from conftest import compose_config

pytestmark = pytest.mark.slow


def test_each_agents_engines_run_in_their_own_placement_group(hetero_team):
    groups = [agent.engines.placement.group for agent in hetero_team.agents]
    assert groups[0].id != groups[1].id
    for agent, group in zip(hetero_team.agents, groups):
        table = placement_group_table(group)
        assert table["state"] == "CREATED"
        assert list(table["bundles"].values()) == [{"CPU": 1.0}]  # replicas=1, engine.num_cpus=1
        for actor in agent.engines.actors:
            described = ray.get(actor.describe.remote())
            assert described["placement_group"] == group.id.hex()
            assert described["dtype"] == "float32"  # auto on a CPU engine, whatever the CPU's bf16 support


def test_gpu_counts_that_do_not_fit_fail_before_any_actor(ray_session):
    cfg = compose_config("engine.num_gpus=1")
    with pytest.raises(ConfigError, match="the run's actors need 2 GPUs in all") as err:
        init_ray(cfg)
    assert err.value.key == "engine.num_gpus" and "the cluster has 0" in str(err.value)


def test_a_bundle_larger_than_any_node_is_named(ray_session):
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(ConfigError, match=f"the largest node has {cpus:g} CPU") as err:
        check_bundles_fit({"team.agents[1].engine": [{"CPU": cpus + 1}]})
    assert err.value.key == "team.agents[1].engine"


def test_an_unplaceable_group_is_an_error_and_is_released(ray_session):
    with pytest.raises(ConfigError, match="could not be placed within 1s") as err:
        reserve([{"CPU": 1.0}, {"GPU": 1.0}], "team.agents[0].engine", timeout_s=1.0)
    assert err.value.key == "team.agents[0].engine"
    pending = [g for g in placement_group_table().values() if g["state"] not in ("CREATED", "REMOVED")]
    assert pending == []  # the half-placed group did not stay behind holding its CPU
