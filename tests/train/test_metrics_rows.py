"""metrics.jsonl rows (albef_ds/train/metrics.py): each says when it was written, a resumed
launch marks where it took over, and every reader of training rows passes the marker by."""
import json
import time

from albef_ds.gpu_check import per_step
from albef_ds.train.metrics import MetricsLogger, is_event
from albef_ds.train.plot import read_metrics


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_row_has_its_wall_clock_time_and_a_resume_writes_a_marker_row(tmp_path):
    before = time.time()
    first = MetricsLogger(tmp_path, True, tensorboard=False, resume_step=0)
    for step in (1, 2, 3):
        first.log(step, {"loss": 1.0 / step})
    first.close()
    # the launch that resumes from step 2's checkpoint drops step 3 and says so
    again = MetricsLogger(tmp_path, True, tensorboard=False, resume_step=2)
    again.mark_resume(2, tmp_path / "checkpoints" / "step_00000002", 1)
    again.log(3, {"loss": 0.3})
    again.close()
    rows = rows_of(tmp_path)
    assert [(r["step"], is_event(r)) for r in rows] == [(1, False), (2, False), (2, True), (3, False)], rows
    times = [r["time"] for r in rows]
    assert before - 1 <= times[0] and times == sorted(times) and times[-1] <= time.time() + 1, times
    marker = rows[2]
    assert marker == {"step": 2, "time": marker["time"], "event": "resume",
                      "from": str(tmp_path / "checkpoints" / "step_00000002"), "world_size": 1}
    # the readers of training rows: the plot (and the demo's report), gpu-check's comparison
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(per_step(tmp_path)) == [1, 2, 3] and per_step(tmp_path)[2]["loss"] == 0.5
    # a later resume from an earlier checkpoint drops the marker with the steps it preceded
    MetricsLogger(tmp_path, True, tensorboard=False, resume_step=1).close()
    assert [r["step"] for r in rows_of(tmp_path)] == [1]
