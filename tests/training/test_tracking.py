import json

from conftest import compose_config

from mapoco.training.tracking import Tracker


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_fresh_run_starts_metrics_over_and_a_resumed_one_keeps_the_rows_up_to_its_checkpoint(tmp_path):
    cfg = compose_config("logger.wandb.mode=disabled")
    first = Tracker(cfg, tmp_path, resumed_at=None)
    for step in range(5):  # the run stops after logging step 4; its last checkpoint is step 2
        first.log({"x": step}, step)
    Tracker(cfg, tmp_path, resumed_at=2).log({"x": 30}, 3)
    assert _steps(tmp_path / "metrics.jsonl") == [0, 1, 2, 3]  # step 3 once: the redone one
    Tracker(cfg, tmp_path, resumed_at=None).log({"x": 0}, 0)  # a new run in the same folder
    assert _steps(tmp_path / "metrics.jsonl") == [0]
