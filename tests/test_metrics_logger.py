"""MetricsLogger: metrics.csv and TensorBoard event files, written without importing torch."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOG_SCRIPT = '''
import sys
import numpy as np
from kdiff_jax.training.metrics import MetricsLogger
log = MetricsLogger(sys.argv[1])
log.scalars(1, {'loss': 0.5})
log.scalars(2, {'loss': 0.25, 'fid': 3.0})
log.image(2, 'demo', np.zeros((4, 6, 3), np.uint8))
log.close()
assert 'torch' not in sys.modules, 'tensorboardX imported torch'
import torch  # still importable afterwards
print(torch.ones(1).item())
'''


def event_records(path: Path) -> list[bytes]:
    """The records of a TFRecord file (length u64, its CRC, data, the data's CRC), CRCs not checked."""
    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack('<Q', data[at:at + 8])
        records.append(data[at + 12:at + 12 + length])
        at += 12 + length + 4
    return records


def test_csv_and_tensorboard_events_without_importing_torch(tmp_path):
    result = subprocess.run([sys.executable, '-c', LOG_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == '1.0'
    # the new fid column rewrote the file: the first row has it empty
    assert (tmp_path / 'metrics.csv').read_text().splitlines() == ['step,loss,fid', '1,0.5,', '2,0.25,3.0']
    from tensorboardX.proto.event_pb2 import Event
    events = [Event.FromString(r) for f in (tmp_path / 'tb').glob('events.out.tfevents.*') for r in event_records(f)]
    values = {(e.step, v.tag): v for e in events for v in e.summary.value}
    assert values[1, 'loss'].simple_value == 0.5 and values[2, 'fid'].simple_value == 3.0
    assert values[2, 'demo'].image.height == 4 and values[2, 'demo'].image.width == 6
