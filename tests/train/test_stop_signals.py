"""albef_ds/train/stop.py's StopFlag: a first Ctrl-C asks for a checkpoint at the next step;
a second one, later than a launcher's forwarded copy of the first, ends the rank at once."""
import signal

import pytest

from albef_ds.train import stop


def test_a_second_ctrl_c_ends_at_once_but_a_forwarded_copy_of_the_first_does_not(monkeypatch, capfd):
    clock = [100.0]
    monkeypatch.setattr(stop.time, "monotonic", lambda: clock[0])
    flag = stop.StopFlag(handle_signals=False)
    flag._handler(signal.SIGINT, None)
    assert flag.requested and flag.signal_name == "SIGINT"
    assert "Ctrl-C again to end now" in capfd.readouterr().err
    clock[0] += 0.01  # the launcher's copy of the same keypress
    flag._handler(signal.SIGINT, None)
    flag._handler(signal.SIGTERM, None)  # SIGTERM never escalates (SLURM sends it with srun's copy)
    clock[0] += stop.SECOND_INTERRUPT_AFTER_S
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        flag._handler(signal.SIGINT, None)


def test_sigterm_and_sigusr1_only_ask_for_the_checkpoint(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(stop.time, "monotonic", lambda: clock[0])
    flag = stop.StopFlag(handle_signals=False)
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM):
        clock[0] += 10
        flag._handler(sig, None)
    assert flag.requested and flag.signal_name == "SIGUSR1"  # the first: why the run stops


def test_the_stop_names_the_signal_received_first_not_the_launchers_copy(monkeypatch, capfd):
    """Ctrl-C under the deepspeed launcher: the terminal's SIGINT reaches every rank, and the
    launcher, which got it too, sends each rank SIGTERM milliseconds later. The stop line
    named SIGTERM, a signal the user never sent."""
    clock = [50.0]
    monkeypatch.setattr(stop.time, "monotonic", lambda: clock[0])
    flag = stop.StopFlag(handle_signals=False)
    flag._handler(signal.SIGINT, None)
    clock[0] += 0.005
    flag._handler(signal.SIGTERM, None)
    assert flag.signal_name == "SIGINT" and flag.first_at == 50.0
    assert capfd.readouterr().err.count("SIGINT: stopping") == 1


@pytest.mark.parametrize("variables,says", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, False),                             # torchrun / deepspeed
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, False),  # srun: no RANK
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, True),
    ({}, True)])                                                           # one process
def test_the_first_ctrl_c_is_announced_by_rank_0_only_under_any_launcher(monkeypatch, capfd, variables, says):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    flag = stop.StopFlag(handle_signals=False)
    flag._handler(signal.SIGINT, None)
    assert flag.requested and capfd.readouterr().err.count("SIGINT: stopping") == int(says)


def test_an_evaluation_reads_the_flag_between_batches_and_ends_with_the_signals_status():
    from albef_ds.errors import Interrupted
    flag = stop.StopFlag(handle_signals=False, interrupt_note=stop.EVALUATION_INTERRUPT_NOTE)
    flag.raise_if_requested("nothing yet")  # no signal: goes on
    flag._handler(signal.SIGTERM, None)
    with pytest.raises(Interrupted, match="stopped by SIGTERM during the test: no result written") as e:
        flag.raise_if_requested("the test")
    assert e.value.exit_status == 128 + signal.SIGTERM


@pytest.mark.slow
def test_ctrl_c_under_the_deepspeed_launcher_ends_with_the_stop_line_naming_sigint(synth_data, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group: the launcher's two processes and the
    ranks). The launcher's own main process dies of it with a KeyboardInterrupt traceback
    (deepspeed/launcher/runner.py: not ours to silence) and its launch process sends every
    rank SIGTERM; the stop line used to say SIGTERM and come out inside that traceback. Now
    it names SIGINT, says how to resume, and comes after the traceback; after it only the
    launcher's own closing log lines."""
    import os
    import subprocess
    import time

    from tests.support.launch import albef_command, env
    from tests.support.runs import pretrain_args
    data, tok = synth_data
    run = tmp_path / "run"
    cmd = albef_command(2, pretrain_args(run, data, tok, 2, 200, ["--set", "checkpoint.every_steps=1000"]),
                        launcher="deepspeed")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("step ") and " 1/200 " in line:
                os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "\n".join(lines)
    stops = [i for i, line in enumerate(lines) if line.startswith("stop requested (")]
    assert len(stops) == 1, out[-4000:]
    line = lines[stops[0]]
    assert line.startswith("stop requested (SIGINT): checkpoint at step ") and \
        line.endswith(" committed; rerun the same command to resume"), line
    assert "(SIGTERM)" not in out and out.count("SIGINT: stopping at the next step") == 1, out[-4000:]
    if "KeyboardInterrupt" in out:  # the launcher's: printed before the line, not around it
        assert max(i for i, x in enumerate(lines) if x.startswith("KeyboardInterrupt")) < stops[0], out[-4000:]
    assert all("[launch.py:" in x for x in lines[stops[0] + 1:] if x.strip()), out[-4000:]
    step = int(line.split("checkpoint at step ")[1].split()[0])
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    # nothing left running (a rank's resource tracker ends a moment after its rank)
    deadline = time.monotonic() + 10
    while (left := subprocess.run(["ps", "-o", "pid=,args=", "-s", str(proc.pid)], capture_output=True, check=False,
                                  text=True).stdout.strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    print(out[out.index("SIGINT: stopping"):])
