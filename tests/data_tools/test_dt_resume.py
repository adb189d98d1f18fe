"""Resumable, parallel conversion: a 4-worker run killed with SIGKILL mid-way and re-run
gives every pair exactly once; 3 array tasks plus merge give the keys of one conversion."""
import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

import tests.support.formats as F
from data_tools.cli import main
from data_tools.merge import list_parts


def webdataset(root, n_tars, per_tar, size=128):
    os.makedirs(root, exist_ok=True)
    images = [F.jpeg(i, size=size) for i in range(50)]
    expected = {}
    for s in range(n_tars):
        with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tar:
            for r in range(per_tar):
                key = f"{s:05d}{r:04d}"
                img, cap = images[(s * per_tar + r) % len(images)], f"caption {s} {r}"
                for name, data in ((f"{key}.jpg", img), (f"{key}.txt", cap.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                expected[f"wds/{key}"] = (F.sha1(img), cap)
    return expected


def convert_command(inputs, out, workers: int) -> tuple[list[str], dict]:
    """``albef-data convert INPUTS --out OUT`` as its own process, and its environment."""
    cmd = [sys.executable, "-m", "data_tools.cli", "convert", str(inputs), "--out", str(out),
           "--workers", str(workers), "--no-progress"]
    return cmd, dict(os.environ, OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_each_pair_exactly_once(tmp_path):
    n_tars = 30
    expected = webdataset(str(tmp_path / "wds"), n_tars=n_tars, per_tar=60)
    out = tmp_path / "out"
    cmd, env = convert_command(tmp_path / "wds", out, workers=4)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        done = len(list_parts(str(out))) if out.exists() else 0
        if done >= 3:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and all 4 workers, mid-conversion
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    finished = len(list_parts(str(out)))
    assert 3 <= finished < n_tars
    assert not (out / "index.json").exists()  # killed before the merge

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({finished} already done)" in rerun.stderr  # finished parts were kept, not redone
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]  # leftovers cleaned
    got, keys = F.read_dataset(str(out))
    assert len(keys) == len(set(keys)) == len(expected)  # no pair twice, none lost
    assert got == expected


def test_three_array_tasks_plus_merge_equal_one_conversion(tmp_path):
    webdataset(str(tmp_path / "wds"), n_tars=7, per_tar=5, size=24)
    tsv = F.caption_tsv(str(tmp_path / "cc.tsv"), str(tmp_path), n=11)
    for inp, extra in ((tmp_path / "wds", []), (tmp_path / "cc.tsv", ["--caption-col", "0", "--image-col", "1"])):
        name = inp.stem
        base = ["convert", str(inp), "--no-progress", "--rows-per-unit", "2", *extra]
        assert main(base + ["--out", str(tmp_path / f"one_{name}")]) == 0
        for task in range(3):
            assert main(base + ["--out", str(tmp_path / f"arr_{name}"), "--num-tasks", "3", "--task-id", str(task)]) == 0
        assert not (tmp_path / f"arr_{name}" / "index.json").exists()  # tasks leave merging to `merge`
        assert main(["merge", str(tmp_path / f"arr_{name}")]) == 0
        one, one_keys = F.read_dataset(str(tmp_path / f"one_{name}"))
        arr, arr_keys = F.read_dataset(str(tmp_path / f"arr_{name}"))
        assert sorted(arr_keys) == sorted(one_keys) and len(set(arr_keys)) == len(arr_keys)
        assert arr == one
    assert len(one) == len(tsv)


def test_rerun_with_other_inputs_into_same_folder_is_refused(tmp_path, capsys):
    F.coco_json(str(tmp_path / "a.json"))
    F.caption_tsv(str(tmp_path / "b.tsv"), str(tmp_path), n=3)
    assert main(["convert", str(tmp_path / "a.json"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert main(["convert", str(tmp_path / "a.json"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert main(["convert", str(tmp_path / "b.tsv"), "--out", str(tmp_path / "out"), "--no-progress",
                 "--caption-col", "0", "--image-col", "1"]) == 2
    assert "other inputs" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume_exits_130_and_the_rerun_resumes(tmp_path):
    """SIGINT to the terminal's process group (what Ctrl-C sends: the driver and its two
    workers) mid-conversion: one line saying that the same command resumes, exit status
    130, no traceback; the same command then keeps the finished parts and ends the job."""
    n_tars = 40
    expected = webdataset(str(tmp_path / "wds"), n_tars=n_tars, per_tar=40)
    out = tmp_path / "out"
    cmd, env = convert_command(tmp_path / "wds", out, workers=2)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and list_parts(str(out)):
            os.killpg(proc.pid, signal.SIGINT)  # as the terminal does: every process of the group
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert said == [(f"albef-data convert: interrupted; run the same command again to resume where it "
                     f"stopped (finished parts in {out} are kept, unfinished ones are redone); to start "
                     f"over instead, delete {out} first")], err
    finished = len(list_parts(str(out)))
    assert 1 <= finished < n_tars

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({finished} already done)" in rerun.stderr  # resumed where it stopped
    got, keys = F.read_dataset(str(out))
    assert len(keys) == len(set(keys)) == len(expected) and got == expected
