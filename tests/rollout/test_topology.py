"""Who sees whom, by hand, for every topology."""

from mapoco.rollout.topology import audience, visible_peers


def test_visible_peers_topologies():
    assert visible_peers(1, 4, "all_to_all") == [0, 2, 3]
    assert visible_peers(0, 4, "ring") == [3]
    assert visible_peers(2, 4, "star") == [0] and visible_peers(0, 4, "star") == [1, 2, 3]
    assert visible_peers(0, 1, "ring") == [] and visible_peers(0, 1, "all_to_all") == []
    assert audience(0, 4, "ring") == [1] and audience(0, 4, "star") == [1, 2, 3] and audience(3, 4, "star") == [0]
    assert audience(1, 3, "all_to_all") == [0, 2] and audience(0, 1, "all_to_all") == []
