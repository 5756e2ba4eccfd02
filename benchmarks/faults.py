"""Fault soak: a 2-process DDP training (torchrun, gloo on CPU) that is hit, several times per run, by the faults
of a shared cluster, resumed each time, and compared at the end with an uninterrupted run.

Faults, chosen at random at random moments after a checkpoint exists:

* ``kill-worker``: SIGKILL one worker process; torchrun (``--max-restarts``) restarts both workers, which resume
  from ``checkpoint-last.pth`` inside the same job.
* ``sigterm``: SIGTERM to the torchrun agent (what SLURM or Kubernetes send on preemption); the workers save at
  the next step and the job ends (exit 143); the soak starts the same command again.
* ``disk-full``: the output folder is a 3 MB tmpfs (root only; otherwise this fault is not drawn) that a filler
  file fills up; the next write ends the job (exit 74) with the last checkpoint intact; the soak frees the space
  and starts the same command again.

Steps lost per fault: the last training step rank 0's progress bar showed before the fault (it refreshes every
0.1 s, so a lower bound) minus the step the resumed run continues from, at least 0. The table (markdown) goes to
stdout; docs/reliability.md shows it.

Usage: ``python benchmarks/faults.py [--faults 6] [--epochs 3] [--checkpoint-steps 5] [--seed 0] [--work DIR]``.
The process helpers here are also what tests/test_faults.py drives its jobs with.
"""
import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from refiner_vit.train.checkpoint import CHECKPOINT_NAME, load_training_state

# A tiny model on the embedded digits: 22 steps per epoch with 2 processes.
TINY = ['--img-size', '16', '--model-kwargs', 'depth=2', 'embed_dim=32', '--no-tensorboard',
        '--precise-bn-batches', '4', '--workers', '0']


def environment() -> Dict[str, str]:
    """This process's environment (read now, not at import), one thread per training process."""
    return {**os.environ, 'OMP_NUM_THREADS': '1'}


def torchrun(out: Path, args: Sequence[str], nproc: int = 2, max_restarts: int = 0, progress: bool = False,
             log: Optional[Path] = None, program: Sequence[str] = ('-m', 'refiner_vit', 'train')) -> subprocess.Popen:
    """Start ``torchrun --standalone ... -m refiner_vit train --output OUT ARGS`` (or another ``program`` taking the
    same arguments) in a session of its own (so :func:`kill_job` ends every process of it); stdout and stderr go to
    ``log`` (default ``OUT.log``)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc),
           '--max-restarts', str(max_restarts), *program, '--output', str(out), *TINY, *args]
    if not progress:
        cmd.append('--no-progress')
    handle = open(log or out.with_name(out.name + '.log'), 'ab')
    try:
        return subprocess.Popen(cmd, env=environment(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        handle.close()


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the job: its session and every process below it (torchrun starts each worker in
    a session of its own, which a signal to the agent's process group does not reach)."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def descendants(pid: int) -> List[int]:
    """All processes below ``pid`` (from /proc)."""
    parents: Dict[int, List[int]] = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def worker_pid(agent: int, rank: int) -> Optional[int]:
    """The training process of global ``rank`` under the torchrun agent ``agent`` (its ``RANK`` variable)."""
    for pid in descendants(agent):
        try:
            env = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
        except OSError:
            continue
        if f'RANK={rank}'.encode() in env and b'TORCHELASTIC_RUN_ID' in b' '.join(e[:20] for e in env):
            return pid
    return None


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 600.) -> bool:
    """Poll ``condition`` until it holds (True), the job ends or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def position(out: Path, steps_per_epoch: int) -> int:
    """The global step the checkpoint in ``out`` continues from (0 without one)."""
    path = out / CHECKPOINT_NAME
    if not path.is_file():
        return 0
    state = load_training_state(path)
    return state['epoch'] * steps_per_epoch + state.get('step', 0)


def final_weights(out: Path) -> Dict[str, torch.Tensor]:
    return load_training_state(out / CHECKPOINT_NAME)['model']


def max_weight_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """The largest absolute difference over every tensor of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0. for k in a)


def last_reported_step(log: Path) -> Tuple[int, int]:
    """The last ``STEP/TOTAL`` of rank 0's progress bar in ``log`` ((0, 0) if none yet)."""
    counts = re.findall(rb'(\d+)/(\d+) \[', log.read_bytes()) if log.is_file() else []
    return (int(counts[-1][0]), int(counts[-1][1])) if counts else (0, 0)


def mount_tmpfs(folder: Path, megabytes: int) -> bool:
    """Mount a tmpfs of ``megabytes`` on ``folder`` (made if missing); False where that is not allowed (not root,
    no CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={megabytes}M', 'tmpfs', str(folder)],
                          capture_output=True).returncode == 0


def fill_disk(folder: Path) -> Path:
    """Write a filler file in ``folder`` until its file system is full; returns it."""
    filler = folder / 'filler.bin'
    with open(filler, 'wb') as f:
        try:
            while True:
                f.write(b'\0' * 65536)
                f.flush()
        except OSError:
            pass
    return filler


class Soak:
    """One faulted run: jobs of the same torchrun command, faults injected into them, until one job finishes."""

    def __init__(self, out: Path, log: Path, args: List[str], steps_per_epoch: int, rng: random.Random,
                 checkpoint_steps: int) -> None:
        self.out, self.log, self.args, self.steps_per_epoch, self.rng = out, log, args, steps_per_epoch, rng
        self.checkpoint_steps = checkpoint_steps
        self.rows: List[dict] = []

    def position(self) -> int:
        return position(self.out, self.steps_per_epoch)

    def rounds(self) -> int:
        """Worker rounds started so far (rank 0 prints one header line per round)."""
        return self.log.read_text(errors='replace').count('refiner train: refiner_vit') if self.log.is_file() else 0

    def run(self, plan: List[str], max_restarts: int) -> None:
        while True:
            proc = torchrun(self.out, self.args, max_restarts=max_restarts, progress=True, log=self.log)
            try:
                if self._inject(proc, plan) == 0:
                    return
            finally:
                kill_job(proc)

    def _inject(self, proc: subprocess.Popen, plan: List[str]) -> Optional[int]:
        """Inject faults of ``plan`` into the job; its exit code, or None where it was stopped to be started again."""
        while plan:
            # a random moment at least one checkpoint after the point the job (or its last round) resumed from
            target = self.position() + 1 + self.rng.randrange(self.checkpoint_steps)
            if not wait_until(lambda t=target: self.position() >= t, proc, timeout=300):
                return proc.wait(timeout=300)
            time.sleep(self.rng.uniform(0, 0.5))
            kind = plan.pop(0)
            row = dict(kind=kind, reached=last_reported_step(self.log)[0])
            self.rows.append(row)
            rounds = self.rounds()
            if kind == 'kill-worker':  # torchrun starts a new round, which resumes from the checkpoint
                pid = worker_pid(proc.pid, self.rng.randrange(2))
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                row['survived'] = wait_until(lambda r=rounds: self.rounds() > r, proc, timeout=300)
            elif kind == 'sigterm':  # the job ends after the checkpoint of the next step; started again
                proc.send_signal(signal.SIGTERM)
                row['code'] = proc.wait(timeout=300)
                row['survived'] = 'preempted by SIGTERM' in self.log.read_text(errors='replace')
            else:  # the next write fails and ends the round; space is freed, and torchrun's next round resumes
                writes = self.log.read_text(errors='replace').count('cannot write')
                filler = fill_disk(self.out)
                try:
                    wait_until(lambda w=writes: self.log.read_text(errors='replace').count('cannot write') > w,
                               proc, timeout=300)
                finally:
                    filler.unlink()
                row['survived'] = wait_until(lambda r=rounds: self.rounds() > r, proc, timeout=300)
            row['resumed'] = self.position()
            if kind == 'sigterm':
                return None
        return proc.wait(timeout=600)


def soak(work: Path, faults: int, epochs: int, checkpoint_steps: int, seed: int) -> dict:
    """The uninterrupted run and the faulted one in ``work``; returns the table's numbers."""
    rng = random.Random(seed)
    args = ['--epochs', str(epochs), '--checkpoint-steps', str(checkpoint_steps), '--resume', 'auto']
    reference = work / 'reference'
    proc = torchrun(reference, args, progress=True)
    try:
        if proc.wait() != 0:
            raise SystemExit(f'the uninterrupted run failed; see {reference}.log')
    finally:
        kill_job(proc)
    total = last_reported_step(reference.with_name('reference.log'))[1]
    disk = work / 'disk'
    kinds = ['kill-worker', 'sigterm'] + (['disk-full'] if mount_tmpfs(disk, 3) else [])
    plan = [rng.choice(kinds) for _ in range(faults)]
    run = Soak(disk / 'run', work / 'faulted.log', args, total // epochs, rng, checkpoint_steps)  # log off the disk
    try:
        run.run(plan, max_restarts=2 * faults)
        weights = final_weights(run.out)
    finally:
        if disk.is_mount():
            subprocess.run(['umount', str(disk)], check=False)
    return dict(rows=run.rows, difference=max_weight_difference(weights, final_weights(reference)), total=total,
                kinds=kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--faults', type=int, default=6)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--checkpoint-steps', type=int, default=5)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--work', type=Path, default=None, help='working folder (default: a temporary one)')
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix='refiner_faults_'))
    work.mkdir(parents=True, exist_ok=True)
    result = soak(work, args.faults, args.epochs, args.checkpoint_steps, args.seed)
    print('| fault | injected | survived | steps lost (each) | the job |')
    print('|---|---|---|---|---|')
    for kind in ('kill-worker', 'sigterm', 'disk-full'):
        rows = [r for r in result['rows'] if r['kind'] == kind]
        if rows:
            lost = ', '.join(str(max(0, r['reached'] - r['resumed'])) for r in rows)
            ends = ', '.join(sorted({f"ended (torchrun exit {r['code']}), started again" if 'code' in r else
                                     'went on (torchrun restarted the workers)' for r in rows}))
            print(f"| {kind} | {len(rows)} | {sum(r['survived'] for r in rows)} | {lost} | {ends} |")
    print(f"\nlargest weight difference to the uninterrupted run ({result['total']} steps): {result['difference']:g}")


if __name__ == '__main__':
    main()
