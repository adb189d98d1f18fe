"""A run's learning curves as one PNG: the losses and the ITM accuracy, from metrics.jsonl.

matplotlib (a dependency of mosaicml-streaming, so always installed with albef-ds) draws
off-screen (Agg): no display is needed on a cluster node.
"""
from __future__ import annotations

import json
from pathlib import Path

#: ITM's labels are 1 match : 2 non-matches per positive, so "no match" always scores 2/3.
ITM_PRIOR_ACC = 2 / 3
LOSS_KEYS = ("loss_itc", "loss_itm", "loss_mlm")


def read_metrics(path: Path) -> list[dict]:
    """The training lines of metrics.jsonl (those with a loss), in step order."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not JSON ({e})") from None
        if "loss" in row and "step" in row:
            rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def tail_mean(rows: list[dict], key: str, fraction: float = 0.1) -> float | None:
    """Mean of ``key`` over the last ``fraction`` of the logged steps (at least one line)."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return None
    tail = values[-max(1, round(len(values) * fraction)):]
    return sum(tail) / len(tail)


def plot_run(metrics: Path, png: Path, title: str = "") -> Path:
    """Write ``png``: left the ITC/ITM/MLM losses by step, right the ITM training accuracy
    beside its 2/3 prior. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    if not rows:
        raise ValueError(f"{metrics}: no training lines to plot")
    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in LOSS_KEYS:
        if any(key in r for r in rows):
            left.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label=key)
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend()
    left.grid(alpha=0.3)
    if any("itm_acc" in r for r in rows):
        right.plot([r["step"] for r in rows if "itm_acc" in r], [r["itm_acc"] for r in rows if "itm_acc" in r],
                   label="ITM accuracy (training batches)")
        right.axhline(ITM_PRIOR_ACC, color="gray", linestyle="--", label="prior: always 'no match'")
        right.set_ylim(0.5, 1.0)
        right.legend(loc="lower right")
    right.set_xlabel("step")
    right.grid(alpha=0.3)
    right.set_xlim(0, max(steps))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
