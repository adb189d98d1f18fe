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
    assert flag.requested and flag.signal_name == "SIGTERM"
