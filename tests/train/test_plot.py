"""The learning-curve PNG and the tail means the demo prints (albef_ds/train/plot.py)."""
import json

import pytest
from PIL import Image

from albef_ds.train.plot import ITM_PRIOR_ACC, plot_run, read_metrics, tail_mean


def write_metrics(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_tail_mean_is_the_mean_of_the_last_tenth_of_logged_lines(tmp_path):
    rows = [{"step": 10 * i, "loss": 1.0, "itm_acc": float(i)} for i in range(1, 21)]
    rows.insert(5, {"step": 55, "r_mean": 3.0})  # an eval line: not a training line
    write_metrics(tmp_path / "m.jsonl", rows)
    read = read_metrics(tmp_path / "m.jsonl")
    assert len(read) == 20 and all("loss" in r for r in read)
    assert tail_mean(read, "itm_acc") == pytest.approx((19 + 20) / 2)  # 10 % of 20 lines = 2
    assert tail_mean(read, "absent") is None
    assert ITM_PRIOR_ACC == pytest.approx(2 / 3)


def test_plot_writes_a_png_and_bad_lines_name_the_file_and_line(tmp_path):
    rows = [{"step": 10 * i, "loss": 3.0 - 0.1 * i, "loss_itc": 1.0, "loss_itm": 0.6, "loss_mlm": 1.4,
             "itm_acc": 0.66 + 0.01 * i} for i in range(1, 11)]
    write_metrics(tmp_path / "m.jsonl", rows)
    png = plot_run(tmp_path / "m.jsonl", tmp_path / "out" / "curves.png", title="t")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2"):
        read_metrics(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no training lines"):
        plot_run(tmp_path / "empty.jsonl", tmp_path / "x.png")
