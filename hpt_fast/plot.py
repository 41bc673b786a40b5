"""``python -m hpt_fast.plot RUN_DIR``: PNG curves of a run's ``metrics.jsonl`` in ``RUN_DIR/plots/``.

One file per panel of ``PANELS`` (reward, validation accuracy, SFT fraction, loss parts, entropy,
grad norm, clip fraction, response length, the step-time split stacked, tokens/s), each against
the step; a panel whose metrics the run never logged is skipped. When several lines hold the same
step, the later values win: a run resumed from a checkpoint logs again the steps it had done
after that checkpoint, and the step-0 validation has a line of its own.

Needs matplotlib (``pip install matplotlib``), which the rest of hpt_fast does not.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hpt_fast.metrics import METRICS_FILE


@dataclass(frozen=True)
class Panel:
    """One PNG: ``keys`` (and every metric starting with ``prefix``) against the step.

    ``stacked``: the series are drawn as stacked areas (parts of a whole, such as the step time).
    """

    name: str
    title: str
    ylabel: str
    keys: tuple[str, ...] = ()
    prefix: Optional[str] = None
    stacked: bool = False

    def series_keys(self, present: set[str]) -> list[str]:
        """The keys of this panel among ``present``, in drawing order."""
        found = [k for k in self.keys if k in present]
        if self.prefix is not None:
            found += sorted(k for k in present if k.startswith(self.prefix))
        return found


PANELS: tuple[Panel, ...] = (
    Panel("reward", "training reward (rollouts)", "mean reward", ("reward_mean",)),
    Panel("validation", "validation accuracy", "accuracy", prefix="val/"),
    Panel("sft_fraction", "prompts trained on demonstrations", "SFT fraction", ("sft_fraction",)),
    Panel("loss", "loss and its parts", "loss", ("loss", "rl_loss", "sft_loss", "entropy_loss")),
    Panel("entropy", "policy entropy", "mean entropy per token", ("entropy_mean",)),
    Panel("grad_norm", "gradient norm (before clipping)", "grad norm", ("grad_norm",)),
    Panel("clip_fraction", "clipped ratio tokens", "fraction", ("clip_fraction",)),
    Panel("response_length", "rollout response length", "tokens", ("response_length",)),
    Panel("time", "step time split", "seconds",
          ("time_rollout", "time_reward", "time_train", "time_weight_update"), stacked=True),
    Panel("tokens_per_s", "throughput", "tokens / s", ("tokens_per_s",)),
)
# series with at most this many points get markers: validation runs every few steps only
MARKER_MAX_POINTS = 50


class PlotError(ValueError):
    """A run directory that cannot be plotted; the message says why."""


def load_steps(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> its numeric metrics from ``RUN_DIR/metrics.jsonl``, later lines overriding earlier.

    Unlike ``hpt_fast.metrics.read_metrics``, a line that is not a JSON object is skipped with a
    warning: a run killed mid-write leaves a partial line, which a resumed run then continues on.
    """
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise PlotError(f"{run_dir}: no such directory")
    if not path.is_file():
        raise PlotError(f"{path}: not found (is {run_dir} a run directory?)")
    steps: dict[int, dict[str, float]] = {}
    bad = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not _is_number(row.get("step")):
            bad.append(lineno)
            continue
        numeric = {k: float(v) for k, v in row.items() if k != "step" and _is_number(v)}
        steps.setdefault(int(row["step"]), {}).update(numeric)
    if bad:
        print(f"warning: {path}: skipped {len(bad)} malformed line(s): {', '.join(map(str, bad[:10]))}",
              file=sys.stderr)
    if not steps:
        raise PlotError(f"{path}: no metrics to plot")
    return steps


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotError("plotting needs matplotlib, which is not installed: pip install matplotlib") from None
    return Figure, FigureCanvasAgg, MaxNLocator


def _line_styles(keys: Sequence[str]) -> list[dict[str, str]]:
    """Matplotlib styles: one colour per benchmark ("val/<name>/..."), avg@n solid, pass@n dashed."""
    groups: dict[str, str] = {}
    styles = []
    for key in keys:
        group = key.rsplit("/", 1)[0] if key.startswith("val/") else key
        color = groups.setdefault(group, f"C{len(groups) % 10}")
        styles.append({"color": color, "linestyle": "--" if "/pass@" in key else "-"})
    return styles


def plot_run(run_dir: Path, out_dir: Optional[Path] = None) -> list[Path]:
    """Write one PNG per panel with data into ``out_dir`` (default ``RUN_DIR/plots``); returns their paths."""
    Figure, FigureCanvasAgg, MaxNLocator = _import_matplotlib()
    steps = load_steps(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    present = {k for metrics in steps.values() for k in metrics}
    order = sorted(steps)
    written = []
    for panel in PANELS:
        keys = panel.series_keys(present)
        if not keys:
            continue
        # figures built directly on the Agg canvas: no pyplot state, no display needed
        fig = Figure(figsize=(7, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        if panel.stacked:
            xs = [s for s in order if any(k in steps[s] for k in keys)]
            ax.stackplot(xs, [[steps[s].get(k, 0.0) for s in xs] for k in keys], labels=keys, alpha=0.85)
        else:
            for key, style in zip(keys, _line_styles(keys)):
                xs = [s for s in order if key in steps[s]]
                marker = "o" if len(xs) <= MARKER_MAX_POINTS else None
                ax.plot(xs, [steps[s][key] for s in xs], label=key, marker=marker, markersize=3, **style)
        ax.set(title=panel.title, xlabel="step", ylabel=panel.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize="small", loc="best")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{panel.name}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpt_fast.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run's output directory (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="where to write the PNGs (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
