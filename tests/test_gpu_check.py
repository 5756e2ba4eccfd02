"""benchmarks/gpu_check.sh, checked where there is no GPU: its --dry-run runs every step on the CPU at toy sizes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / 'gpu_check'
    done = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu_check.sh'), '--dry-run', str(out)],
                          env={**os.environ, 'PYTHON': sys.executable}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert 'skipped' in (out / 'tests.txt').read_text()  # the cuda tests ran (and skipped: no GPU here)
    for name in ('bench.json', 'bench_no_recompute.json', 'bench_recompute_half_batch.json', 'bench_ckpt.json'):
        rows = json.loads((out / name).read_text())['results']
        assert rows and all(row['img_per_s'] > 0 for row in rows), name
    assert [row['model'] for row in json.loads((out / 'bench_ckpt.json').read_text())['results']] == \
        ['test_refiner_vit+ckpt']
    assert [row['model'] for row in json.loads((out / 'bench_no_recompute.json').read_text())['results']] == \
        ['test_refiner_vit', 'test_refiner_vit [refiner_recompute=False]']  # in the same rounds
    assert json.loads((out / 'digits' / 'summary.json').read_text())['epochs'] == 1
