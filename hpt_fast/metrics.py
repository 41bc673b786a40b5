"""Run logging: a tqdm progress bar, ``metrics.jsonl`` (one JSON object per step) and TensorBoard
when it is installed. Only rank 0 writes; other ranks get a logger that does nothing."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class _Bar:
    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def update(self, m: dict[str, Any]) -> None:
        self.bar.set_postfix(
            reward=f"{m['reward_mean']:.3f}" if "reward_mean" in m else "-",  # none without rollouts
            sft=f"{m.get('sft_fraction', 0.0):.2f}",
            tok_s=f"{m.get('tokens_per_s', 0.0):.0f}", refresh=False,
        )
        self.bar.update(1)


class MetricsLogger:
    """Appends each step's metrics to ``<run_dir>/metrics.jsonl`` (and TensorBoard's event files)."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self.tb = None

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, metrics.get("step", 0))

    @contextmanager
    def progress(self, total: int, initial: int = 0) -> Iterator[_Bar]:
        bar = tqdm(total=total, initial=initial, desc="hpt", unit="step", disable=not self.enabled, dynamic_ncols=True)
        try:
            yield _Bar(bar)
        finally:
            bar.close()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics of a run, one dict per logged line."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
