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


def test_an_evaluation_reads_the_flag_between_batches_and_ends_with_the_signals_status():
    from albef_ds.errors import Interrupted
    flag = stop.StopFlag(handle_signals=False, interrupt_note=stop.EVALUATION_INTERRUPT_NOTE)
    flag.raise_if_requested("nothing yet")  # no signal: goes on
    flag._handler(signal.SIGTERM, None)
    with pytest.raises(Interrupted, match="stopped by SIGTERM during the test: no result written") as e:
        flag.raise_if_requested("the test")
    assert e.value.exit_status == 128 + signal.SIGTERM
