"""What a run leaves in ``--output``: metrics.jsonl, summary.json, config.yaml, curves.png, TensorBoard.

``metrics.jsonl`` is rewritten whole (atomically) after each epoch from the in-memory history, which on
resume is the file's lines for the epochs already done: each epoch appears exactly once, whatever moment a
previous run was killed at.
"""
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..utils.io import atomic_write

__all__ = ['RunLog', 'write_json', 'write_yaml']

def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + '\n').encode()))


def write_yaml(path: Path, obj: Dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write(yaml.safe_dump(obj, sort_keys=False).encode()))


class RunLog:
    """Per-epoch metrics history of a run and its files (main process only; reads only until :meth:`append`)."""

    def __init__(self, output: Path, start_epoch: int, tensorboard: bool = True) -> None:
        self.output = output
        self.path = output / 'metrics.jsonl'
        self.history: List[Dict[str, Any]] = []
        if start_epoch > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a killed run
                if isinstance(row, dict) and isinstance(row.get('epoch'), int) and row['epoch'] <= start_epoch:
                    self.history.append(row)
        self.history = list({row['epoch']: row for row in self.history}.values())
        self.tensorboard = tensorboard
        self.writer: Optional[Any] = None  # opened at the first append: nothing is written before a result

    def _tensorboard(self) -> Optional[Any]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.output / 'tensorboard'))

    def append(self, row: Dict[str, Any]) -> None:
        """Record one epoch (1-based ``epoch``), rewrite metrics.jsonl and the curves."""
        self.history = [r for r in self.history if r['epoch'] < row['epoch']] + [row]
        text = ''.join(json.dumps(r) + '\n' for r in self.history)
        atomic_write(self.path, lambda f: f.write(text.encode()))
        if self.tensorboard and self.writer is None:
            self.writer = self._tensorboard()
        if self.writer is not None:
            for key, value in row.items():
                if key != 'epoch' and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row['epoch'])
            self.writer.flush()
        self.plot()

    def plot(self) -> None:
        """``curves.png``: training loss and validation top-1 per epoch."""
        import matplotlib
        matplotlib.use('Agg')
        from matplotlib import pyplot as plt

        epochs = [r['epoch'] for r in self.history]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
        ax_loss.plot(epochs, [r['train_loss'] for r in self.history], marker='o')
        ax_loss.set(xlabel='epoch', ylabel='training loss', title='loss')
        ax_acc.plot(epochs, [r['top1'] for r in self.history], marker='o', label='top-1')
        ax_acc.plot(epochs, [r['top5'] for r in self.history], marker='.', label='top-5')
        ax_acc.set(xlabel='epoch', ylabel='validation accuracy (%)', title='accuracy')
        ax_acc.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format='png', dpi=80)
        plt.close(fig)
        atomic_write(self.output / 'curves.png', lambda f: f.write(buffer.getvalue()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
