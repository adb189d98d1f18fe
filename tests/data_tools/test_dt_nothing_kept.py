"""A convert that keeps nothing exits non-zero with a hint at the likely cause; one that
keeps something, a resumed one, and an array task without units still exit 0."""
import json
import tarfile

import tests.support.formats as F
from data_tools.cli import EXIT_NOTHING_KEPT, main


def convert(inputs, out, *extra):
    return main(["convert", *map(str, inputs), "--out", str(out), "--no-progress", *extra])


def test_cc3m_url_list_as_distributed_exits_non_zero_saying_download_first(tmp_path, capsys):
    lines = [f"a picture number {i}\thttp://images.example.com/{i}.jpg" for i in range(64)]
    (tmp_path / "Train_GCC-training.tsv").write_text("\n".join(lines) + "\n")
    # the command docs/data.md gives for CC3M
    rc = convert([tmp_path / "Train_GCC-training.tsv"], tmp_path / "out", "--no-header", "--caption-col", "0",
                 "--image-col", "1", "--image-root", str(tmp_path / "imgs"))
    err = capsys.readouterr().err
    assert rc == EXIT_NOTHING_KEPT != 0
    assert "kept 0 of 64 rows" in err and "the image column holds URLs" in err and "img2dataset" in err
    assert "albef-data download" in err and "albef-ds[download]" in err
    assert "http://images.example.com/" in err  # the example names the URL, not imgs/http:/...
    assert str(tmp_path / "out" / "rejects.jsonl") in err


def test_local_paths_that_do_not_exist_name_the_top_reason_and_rejects_file(tmp_path, capsys):
    (tmp_path / "list.tsv").write_text("one\timg/1.jpg\ntwo\timg/2.jpg\n")
    rc = convert([tmp_path / "list.tsv"], tmp_path / "out", "--no-header", "--caption-col", "0", "--image-col", "1")
    err = capsys.readouterr().err
    assert rc != 0
    assert "kept 0 of 2 rows (most: missing_file, 2 rows)" in err and "--image-root" in err
    assert "URLs" not in err and str(tmp_path / "out" / "rejects.jsonl") in err


def test_empty_inputs_say_so_and_exit_non_zero(tmp_path, capsys):
    (tmp_path / "empty.tsv").write_text("")
    assert convert([tmp_path / "empty.tsv"], tmp_path / "out", "--no-header", "--caption-col", "0",
                   "--image-col", "1") != 0
    assert "the inputs hold no rows (0 of 0)" in capsys.readouterr().err
    with tarfile.open(tmp_path / "00000.tar", "w"):
        pass  # a tar without members: one unit, no rows
    assert convert([tmp_path / "00000.tar"], tmp_path / "out_tar") == EXIT_NOTHING_KEPT
    assert "read 0 rows" in capsys.readouterr().err


def _small_json(tmp_path, n=6):
    for i in range(n):
        F.write_file(str(tmp_path / "img" / f"{i}.jpg"), F.jpeg(i))
    (tmp_path / "ann.json").write_text(json.dumps([{"image": f"img/{i}.jpg", "caption": f"c {i}"}
                                                   for i in range(n)]))
    return tmp_path / "ann.json"


def test_resume_and_array_tasks_without_units_still_exit_0(tmp_path, capsys):
    src = _small_json(tmp_path)
    out = tmp_path / "out"
    assert convert([src], out, "--rows-per-unit", "3") == 0
    assert convert([src], out, "--rows-per-unit", "3") == 0  # resumed: every part done before
    # 2 units for 3 tasks: task 2 has none and is no failure; then merge as the sbatch does
    arr = tmp_path / "arr"
    for task in range(3):
        assert convert([src], arr, "--rows-per-unit", "3", "--num-tasks", "3", "--task-id", str(task)) == 0
        assert convert([src], arr, "--rows-per-unit", "3", "--num-tasks", "3", "--task-id", str(task)) == 0
    assert "task 2/3: no units of the 2 fall to this task" in capsys.readouterr().err
    assert main(["merge", str(arr)]) == 0
    assert json.loads((arr / "stats.json").read_text())["kept"] == 6


def test_array_task_whose_share_keeps_nothing_exits_non_zero(tmp_path, capsys):
    src = _small_json(tmp_path)
    for i in range(3, 6):  # the second unit's images are gone
        (tmp_path / "img" / f"{i}.jpg").unlink()
    arr = tmp_path / "arr"
    assert convert([src], arr, "--rows-per-unit", "3", "--num-tasks", "2", "--task-id", "0") == 0
    assert convert([src], arr, "--rows-per-unit", "3", "--num-tasks", "2", "--task-id", "1") == EXIT_NOTHING_KEPT
    err = capsys.readouterr().err
    assert "kept 0 of 3 rows (most: missing_file, 3 rows)" in err and "part-*" in err
