"""`nemo-rlsr report RUN_DIR`: PNG plots of a run, drawn from its `metrics.jsonl` alone.

metrics.jsonl is the record of truth (metrics.py), so a report can be drawn for a finished, a
preempted or a still-running run, on any machine, without TensorBoard. One figure per question:
is the reward rising (reward.png), is the policy leaving the reference (kl.png), are responses
growing or collapsing (length.png), is exploration dying or the clip too tight (entropy_clip.png),
and where a step's time goes (time.png: every `time/*` phase stacked, `time/step` as the total).
"""

from __future__ import annotations

from pathlib import Path

from nemo_rlsr.trainer.metrics import read_metrics

FIGSIZE, DPI = (7, 4), 100  # every PNG is 700 x 400 pixels
TOTAL_TIME = "time/step"


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in rows], [v for _, v in rows]


def _figure(title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path) -> Path:
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)  # no bbox_inches="tight": the pixel size stays FIGSIZE * DPI
    plt.close(fig)
    return path


def _reward(records, path):
    plt, fig, ax = _figure("reward (cosine to reference, minus repetition penalty)", "reward")
    steps, mean = _series(records, "reward/mean")
    _, std = _series(records, "reward/std")
    _, low = _series(records, "reward/min")
    _, high = _series(records, "reward/max")
    ax.fill_between(steps, low, high, alpha=0.12, label="min-max over rollouts")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    alpha=0.3, label="mean +- std")
    ax.plot(steps, mean, lw=2, label="mean")
    return _save(plt, fig, ax, path)


def _lines(records, path, title, ylabel, keys):
    plt, fig, ax = _figure(title, ylabel)
    for key in keys:
        ax.plot(*_series(records, key), marker=".", label=key)
    return _save(plt, fig, ax, path)


def _time(records, path):
    plt, fig, ax = _figure("time per step, by phase", "seconds")
    phases = sorted({k for r in records for k in r if k.startswith("time/") and k != TOTAL_TIME})
    steps = [r["step"] for r in records]
    ax.stackplot(steps, [[r.get(k, 0.0) for r in records] for k in phases], labels=phases, alpha=0.8)
    if any(TOTAL_TIME in r for r in records):
        ax.plot(*_series(records, TOTAL_TIME), color="black", lw=1, ls="--", label=TOTAL_TIME)
    return _save(plt, fig, ax, path)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs into `out_dir` (default RUN_DIR/report) and return their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no steps yet")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    return [
        _reward(records, out / "reward.png"),
        _lines(records, out / "kl.png", "KL to the reference policy (k3)", "kl", ["kl"]),
        _lines(records, out / "length.png", "response length", "tokens", ["response/mean_length"]),
        _lines(records, out / "entropy_clip.png", "policy entropy and clipped-token fraction", "value",
               ["entropy", "clip_fraction"]),
        _time(records, out / "time.png"),
    ]
