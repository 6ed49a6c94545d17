"""Training metrics to a CSV file and TensorBoard event files (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


class MetricsLogger:
    """Appends rows to `<run>/metrics.csv` (columns fixed by the first row) and scalars/images to `<run>/tb`."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.csv_path = self.run_dir / 'metrics.csv'
        self.tb_dir = self.run_dir / 'tb'
        self._writer = None
        self._columns: list[str] | None = None
        if enabled:
            from tensorboardX import SummaryWriter
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.tb_dir))
            if self.csv_path.exists():
                with open(self.csv_path) as f:
                    self._columns = next(csv.reader(f), None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), step)
        row = {'step': step, **{k: float(v) for k, v in values.items()}}
        new_file = self._columns is None
        if new_file:
            self._columns = list(row)
        with open(self.csv_path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=self._columns, extrasaction='ignore')
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    def image(self, step: int, name: str, image_uint8: np.ndarray) -> None:
        if self.enabled:
            self._writer.add_image(name, image_uint8, step, dataformats='HWC')

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
