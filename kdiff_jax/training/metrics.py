"""Training metrics to a CSV file and TensorBoard event files (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without importing torch when torch is not loaded yet.

    tensorboardX's writer module imports torch if it can, only to accept torch tensors as values; we log floats and
    numpy arrays. That import took ~3 s of every train.py start on 2 cores. `sys.modules['torch'] = None` makes
    that one `import torch` raise ImportError (tensorboardX's own fallback); the entry is removed afterwards, so
    torch imports normally later in the process."""
    if 'torch' in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules['torch'] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules['torch']
    return SummaryWriter


class MetricsLogger:
    """Appends rows to `<run>/metrics.csv` and scalars/images to `<run>/tb`. A row with a new metric (e.g. the first
    FID) rewrites the file with the extra column; rows without a value leave it empty."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.csv_path = self.run_dir / 'metrics.csv'
        self.tb_dir = self.run_dir / 'tb'
        self._writer = None
        self._columns: list[str] | None = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = summary_writer_class()(str(self.tb_dir))
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
        elif any(k not in self._columns for k in row):  # e.g. the first fid/kid: rewrite with the new columns
            self._add_columns([k for k in row if k not in self._columns])
        with open(self.csv_path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=self._columns, extrasaction='ignore')
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    def _add_columns(self, names: list[str]) -> None:
        with open(self.csv_path, newline='') as f:
            rows = list(csv.DictReader(f))
        self._columns = self._columns + names
        tmp = self.csv_path.with_suffix('.csv.tmp')
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=self._columns, extrasaction='ignore')
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.csv_path)

    def image(self, step: int, name: str, image_uint8: np.ndarray) -> None:
        if self.enabled:
            self._writer.add_image(name, image_uint8, step, dataformats='HWC')

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
