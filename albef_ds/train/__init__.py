"""The training program: engine set-up, loop, checkpoints, schedules, metrics."""
