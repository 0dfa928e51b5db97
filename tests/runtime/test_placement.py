"""Placement groups: each agent's engines in bundles of their own; runs that cannot fit fail with the numbers."""

import pytest
import ray
from conftest import compose_config
from ray.util.placement_group import placement_group_table

from mapoco.config import ConfigError
from mapoco.runtime.cluster import init_ray
from mapoco.runtime.placement import Bundles, check_bundles_fit, reserve

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
        check_bundles_fit({"team.agents[1].engine": Bundles([{"CPU": cpus + 1}])})
    assert err.value.key == "team.agents[1].engine"


def test_a_custom_resource_no_node_offers_is_named(ray_session):
    with pytest.raises(ConfigError, match="the largest node has .* CPU, 0 GPU, 0 node_a") as err:
        check_bundles_fit({"team.agents[0].engine": Bundles([{"CPU": 1.0, "node_a": 1.0}])})
    assert err.value.key == "team.agents[0].engine"


def test_a_strict_spread_group_with_more_ranks_than_nodes_fails_before_any_actor(ray_session):
    cfg = compose_config("command=train", "team=tiny1", "learner.num_learners=2", "learner.placement=STRICT_SPREAD")
    with pytest.raises(ConfigError, match="STRICT_SPREAD puts each of its 2 bundles on a node of its own; 1 of the "
                                          "cluster's 1 nodes can hold one") as err:
        init_ray(cfg)  # the session's Ray is one node
    assert err.value.key == "team.agents[0].learner"


def test_a_strict_pack_group_larger_than_any_node_is_named(ray_session):
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(ConfigError, match=f"STRICT_PACK puts all its bundles on one node: {cpus + 2:g} CPU"):
        check_bundles_fit({"team.agents[0].engine": Bundles([{"CPU": cpus / 2 + 1}] * 2, "STRICT_PACK")})


def test_an_unplaceable_group_is_an_error_and_is_released(ray_session):
    with pytest.raises(ConfigError, match=r"could not be placed \(PACK\) within 1s") as err:
        reserve(Bundles([{"CPU": 1.0}, {"GPU": 1.0}]), "team.agents[0].engine", timeout_s=1.0)
    assert err.value.key == "team.agents[0].engine"
    pending = [g for g in placement_group_table().values() if g["state"] not in ("CREATED", "REMOVED")]
    assert pending == []  # the half-placed group did not stay behind holding its CPU
