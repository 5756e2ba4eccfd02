"""The faults a cluster throws. A restarted torchrun worker, a preemption signal, a stalled peer, a full
disk and a killed loader worker each end in one line with a documented exit code (or, for a restart, do not end
the job), leave a loadable checkpoint, and the resumed run ends with the weights of an uninterrupted one.

Every job runs in a session of its own and is SIGKILLed as a whole at the end of its test, whatever happened.
The torchrun jobs and their helpers come from benchmarks/faults.py, which soaks the same faults at random.
"""
import errno
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing import resource_sharer
from pathlib import Path
from typing import Optional

import pytest
import torch
from helpers import one_error_line
from torch.utils.data import Dataset, TensorDataset

from refiner_vit.cli import main
from refiner_vit.data import loader as loader_module
from refiner_vit.data.loader import RecordingLoader, batches
from refiner_vit.errors import LoaderWorkerError
from refiner_vit.train import preemption
from refiner_vit.train.checkpoint import CHECKPOINT_NAME, load_training_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import faults  # noqa: E402

SINGLE = [*faults.TINY, '--no-progress', '--epochs', '2']
TORCHRUN = ['--epochs', '2', '--checkpoint-steps', '5', '--resume', 'auto']
COMPARED = ('top1', 'top5', 'best_top1', 'train_loss')

# `refiner train ARGS` that sends itself SIGNAL when the engine draws its COUNT-th batch (skipped ones included)
SIGNALLING = r'''
import os, sys
from refiner_vit.cli import main
from refiner_vit.train import engine
signum, count = int(sys.argv[1]), int(sys.argv[2])
real_batches, seen = engine.batches, [0]
def counting(loader):
    for batch in real_batches(loader):
        seen[0] += 1
        if seen[0] == count:
            os.kill(os.getpid(), signum)
        yield batch
engine.batches = counting
sys.exit(main(['train', *sys.argv[3:]]))
'''


# `refiner train ARGS` under torchrun, rank 1 of a restarted round starting 3 s late: rank 0 of that round then
# reaches the store first and must not find the killed round's keys there (gloo's addresses of the dead workers)
LATE_RANK_1 = r'''
import os, sys, time
from refiner_vit.cli import main
if os.environ['RANK'] == '1' and os.environ['TORCHELASTIC_RESTART_COUNT'] != '0':
    time.sleep(3)
sys.exit(main(['train', *sys.argv[1:]]))
'''


def _run(argv: list, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(argv, env=faults.environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        faults.kill_job(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _summary(out: Path) -> dict:
    summary = json.loads((out / 'summary.json').read_text())
    return {k: summary[k] for k in COMPARED}


def _position(out: Path) -> tuple:
    state = load_training_state(out / CHECKPOINT_NAME)
    return state['epoch'], state['step']


def _assert_same_weights(out: Path, reference: Path) -> None:
    weights, expected = faults.final_weights(out), faults.final_weights(reference)
    assert faults.max_weight_difference(weights, expected) == 0.
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def _job_log(out: Path) -> str:
    return out.with_name(out.name + '.log').read_text(errors='replace')


@pytest.fixture(scope='module')
def ddp_reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run (44 steps in 2 epochs, a checkpoint every 5 steps)."""
    out = tmp_path_factory.mktemp('ddp') / 'reference'
    proc = faults.torchrun(out, TORCHRUN)
    try:
        assert proc.wait(timeout=900) == 0, _job_log(out)[-3000:]
    finally:
        faults.kill_job(proc)
    return out


@pytest.fixture(scope='module')
def single_reference(tmp_path_factory) -> Path:
    """An uninterrupted 1-process run (88 steps in 2 epochs)."""
    out = tmp_path_factory.mktemp('single') / 'reference'
    assert main(['train', '--output', str(out), *SINGLE]) == 0
    return out


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_ends_with_the_uninterrupted_weights(ddp_reference, tmp_path):
    """A SIGKILLed worker: torchrun's next round (same agent store) joins a fresh group and resumes exactly."""
    out = tmp_path / 'run'
    program = tmp_path / 'late_rank_1.py'
    program.write_text(LATE_RANK_1)
    proc = faults.torchrun(out, TORCHRUN, max_restarts=1, program=[str(program)])
    try:
        assert faults.wait_until(lambda: (out / CHECKPOINT_NAME).is_file(), proc), _job_log(out)[-3000:]
        killed = faults.worker_pid(proc.pid, 1)
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        assert proc.wait(timeout=900) == 0, _job_log(out)[-3000:]
    finally:
        faults.kill_job(proc)
    log = _job_log(out)
    assert 'rank 0: a peer process failed while waiting for the training steps of epoch' in log
    assert log.count('refiner train: refiner_vit_digits') == 2  # the first round and the restarted one
    _assert_same_weights(out, ddp_reference)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_worker_at_one_step_and_the_resume_is_exact(ddp_reference, tmp_path):
    out = tmp_path / 'run'
    proc = faults.torchrun(out, TORCHRUN)
    try:
        assert faults.wait_until(lambda: (out / CHECKPOINT_NAME).is_file(), proc), _job_log(out)[-3000:]
        proc.send_signal(signal.SIGTERM)  # to the agent, which passes it on to the workers
        proc.wait(timeout=600)
    finally:
        faults.kill_job(proc)
    epoch, step = _position(out)
    assert (epoch, step) < (2, 0) and step > 0, 'stopped inside an epoch, at a step of its own'
    # where the ranks compared their signals: every 16th check, one after each of the 22 steps and each epoch end
    assert (epoch * 23 + step) % preemption.AGREEMENT_INTERVAL == 0, (epoch, step)
    line = (f'refiner train: preempted by SIGTERM in epoch {epoch + 1} at step {step}: saved {out / CHECKPOINT_NAME}; '
            'continue with the same command and --resume auto')
    assert _job_log(out).count(line) == 2  # both workers, at the same step
    proc = faults.torchrun(out, TORCHRUN)
    try:
        assert proc.wait(timeout=900) == 0, _job_log(out)[-3000:]
    finally:
        faults.kill_job(proc)
    _assert_same_weights(out, ddp_reference)


@pytest.mark.slow
def test_sigterm_and_sigusr1_stop_at_the_step_with_exit_143_and_resume_exactly(single_reference, tmp_path):
    reference = single_reference
    out = tmp_path / 'run'
    argv = [sys.executable, '-c', SIGNALLING]
    # SIGTERM while the 10th batch is drawn: step 10 is trained, then the run stops (no --checkpoint-steps)
    done = _run([*argv, str(int(signal.SIGTERM)), '10', '--output', str(out), *SINGLE])
    assert done.returncode == 143, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f'refiner train: preempted by SIGTERM in epoch 1 at step 10: saved {out / CHECKPOINT_NAME}; continue with the '
        'same command and --resume auto')
    assert _position(out) == (0, 10) and not list(out.glob('.*.tmp'))
    # SLURM's --signal: the 10 skipped batches and 15 more drawn, in epoch 1 still
    done = _run([*argv, str(int(signal.SIGUSR1)), '25', '--output', str(out), '--resume', 'auto', *SINGLE])
    assert done.returncode == 143 and 'preempted by SIGUSR1 in epoch 1 at step 25' in done.stderr, done.stderr[-2000:]
    assert _position(out) == (0, 25)
    assert main(['train', '--output', str(out), '--resume', 'auto', *SINGLE]) == 0
    assert _summary(out) == _summary(reference)
    assert faults.max_weight_difference(faults.final_weights(out), faults.final_weights(reference)) == 0.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rank(out: Path, rank: int, port: int, *extra: str) -> subprocess.Popen:
    """One process of a 2-process job started by hand (torchrun's variables, no agent)."""
    env = {**faults.environment(), 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'RANK': str(rank),
           'LOCAL_RANK': str(rank), 'WORLD_SIZE': '2'}
    argv = [sys.executable, '-m', 'refiner_vit', 'train', '--output', str(out), *SINGLE, *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_a_stalled_or_missing_peer_ends_the_run_after_dist_timeout_with_one_line(tmp_path):
    out = tmp_path / 'run'
    port = _free_port()
    ranks = [_rank(out, r, port, '--dist-timeout', '0.2', '--checkpoint-steps', '5') for r in (0, 1)]
    try:
        assert faults.wait_until(lambda: (out / CHECKPOINT_NAME).is_file(), ranks[0])
        os.kill(ranks[1].pid, signal.SIGSTOP)  # alive, holding its sockets, answering nothing
        _, err = ranks[0].communicate(timeout=300)
    finally:
        for proc in ranks:
            faults.kill_job(proc)
    assert ranks[0].returncode == 75, err[-2000:]
    errors = [line for line in err.splitlines() if ': error: ' in line]
    assert len(errors) == 1 and 'Traceback' not in err, err[-2000:]
    assert errors[0].startswith('refiner train: error: rank 0: no answer within --dist-timeout 0.2 min while waiting '
                                'for the training steps of epoch 1'), errors[0]
    assert _position(out)[1] > 0  # the last checkpoint is there to resume
    # a peer that never comes: joining is bounded too
    port = _free_port()
    alone = _rank(tmp_path / 'alone', 0, port, '--dist-timeout', '0.05')
    try:
        _, err = alone.communicate(timeout=300)
    finally:
        faults.kill_job(alone)
    assert alone.returncode == 75, err[-2000:]
    assert f'rank 0: no answer within --dist-timeout 0.05 min while waiting for all 2 processes to join the group at ' \
           f'127.0.0.1:{port}' in err


def _enospc_in_fsync(folder: Path, monkeypatch) -> None:
    """Without root (no tmpfs): a disk that is full for files in ``folder`` (the fsync of every write fails)."""
    real_fsync = os.fsync

    def fsync(fd):
        if Path(os.readlink(f'/proc/self/fd/{fd}')).parent == folder:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', fsync)


def test_a_full_disk_ends_with_one_line_exit_74_and_a_loadable_checkpoint(single_reference, tmp_path, capsys,
                                                                          monkeypatch):
    """A real 3 MB tmpfs when running as root (CI), an injected ENOSPC otherwise; full after epoch 1."""
    disk = tmp_path / 'disk'
    mounted = faults.mount_tmpfs(disk, 3)
    out = disk / 'run'
    try:
        assert main(['train', '--output', str(out), *SINGLE[:-1], '1']) == 0
        before = (out / CHECKPOINT_NAME).read_bytes()
        filler = faults.fill_disk(disk) if mounted else None
        if not mounted:
            _enospc_in_fsync(out, monkeypatch)
        line = one_error_line(capsys, ['train', '--output', str(out), '--resume', 'auto', *SINGLE], code=74)
        assert line.startswith(f'refiner train: error: cannot write {out}/') and line.endswith(
            ': No space left on device; the previous file is unchanged'), line
        assert (out / CHECKPOINT_NAME).read_bytes() == before and _position(out) == (1, 0)
        assert not list(out.glob('.*.tmp')) and not list(out.glob('best/.*.tmp'))
        if mounted:
            filler.unlink()
        else:
            monkeypatch.undo()
        assert main(['train', '--output', str(out), '--resume', 'auto', *SINGLE]) == 0
        assert _summary(out) == _summary(single_reference)
    finally:
        if mounted:
            subprocess.run(['umount', str(disk)], check=False)


@pytest.mark.slow
def test_a_killed_loader_worker_is_one_line_exit_75_and_the_run_resumes_exactly(tmp_path):
    extra = ['--workers', '2', '--checkpoint-steps', '10']
    reference = tmp_path / 'reference'
    assert main(['train', '--output', str(reference), *SINGLE, *extra]) == 0
    out = tmp_path / 'run'
    argv = [sys.executable, '-m', 'refiner_vit', 'train', '--output', str(out), *SINGLE, *extra]
    proc = subprocess.Popen(argv, env=faults.environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert faults.wait_until(lambda: (out / CHECKPOINT_NAME).is_file(), proc)

        def kill_a_worker() -> bool:
            workers = faults.descendants(proc.pid)
            if workers:
                os.kill(workers[0], signal.SIGKILL)
            return bool(workers)
        assert faults.wait_until(kill_a_worker, proc, timeout=60)
        _, err = proc.communicate(timeout=600)
    finally:
        faults.kill_job(proc)
    assert proc.returncode == 75, err[-2000:]
    errors = [line for line in err.splitlines() if ': error: ' in line]
    assert len(errors) == 1 and 'Traceback' not in err, err[-2000:]
    assert errors[0].startswith('refiner train: error: a data-loader worker died: DataLoader worker (pid') and \
        errors[0].endswith('the last checkpoint is intact: rerun with --resume auto'), errors[0]
    assert main(['train', '--output', str(out), '--resume', 'auto', *SINGLE, *extra]) == 0
    assert _summary(out) == _summary(reference)


def test_loader_workers_that_ignore_sigterm_do_not_keep_the_process_from_exiting(tmp_path):
    """At exit multiprocessing SIGTERMs daemonic children and joins them; a loader whose workers ignore SIGTERM and
    were never shut down (a run ending on another worker's death) must still let the process end, quietly."""
    script = tmp_path / 'exit_with_live_workers.py'
    script.write_text(
        'import torch\n'
        'from torch.utils.data import TensorDataset\n'
        'from refiner_vit.data.loader import RecordingLoader\n'
        'ITERATOR = iter(RecordingLoader(TensorDataset(torch.arange(64.)), batch_size=4, num_workers=2))\n'
        'next(ITERATOR)\n')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=faults.environment())
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize('quiet', [False, True])
def test_a_loader_worker_leaves_out_only_the_report_of_a_broken_batch_hand_over(tmp_path, quiet):
    """A worker's resource sharer prints a traceback when a hand-over breaks mid-handshake (the main process stopped
    receiving after another worker died); in a loader worker that report is left out, and nothing else is."""
    script = tmp_path / 'broken_hand_over.py'
    script.write_text(
        'import sys, time\n'
        'from multiprocessing import resource_sharer\n'
        'from multiprocessing.connection import Client\n'
        'from refiner_vit.data.loader import init_worker\n'
        f'if {quiet}:\n'
        '    init_worker(0)\n'
        'sharer = resource_sharer._ResourceSharer()\n'
        'address, _ = sharer.register(lambda conn, pid: None, lambda: None)\n'
        'try:\n'
        "    Client(address, authkey=b'another key')\n"
        'except Exception:\n'
        '    pass\n'
        'time.sleep(0.5)\n'
        "raise RuntimeError('any other error is still reported')\n")
    err = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60).stderr
    assert ('AuthenticationError' in err) is not quiet, err
    assert 'RuntimeError: any other error is still reported' in err, err


def _broken_hand_overs(monkeypatch, kill_after: float = 0.) -> None:
    """Every batch hand-over in this process fails as one with a worker killed mid-way does: fetching the batch's
    shared memory from the worker's resource sharer raises ConnectionResetError. With ``kill_after`` > 0 a worker
    is SIGKILLed that many seconds later, so it still looks alive when the error reaches DataLoader (the race)."""
    earlier = {p.pid for p in multiprocessing.active_children()}

    def detach(self):
        if kill_after:  # a worker of the loader made after this patch, not a child another test left running
            worker = [p for p in multiprocessing.active_children() if p.pid not in earlier][0]
            threading.Timer(kill_after, os.kill, (worker.pid, signal.SIGKILL)).start()
        raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
    monkeypatch.setattr(resource_sharer.DupFd, 'detach', detach)


def _all_batches(workers: int, dataset: Optional[Dataset] = None) -> int:
    """Draw every batch of a 64-item loader (``dataset``, else 0..63) through ``batches``; the batch count."""
    dataset = TensorDataset(torch.arange(64.)) if dataset is None else dataset
    return sum(1 for _ in batches(RecordingLoader(dataset, batch_size=4, num_workers=workers)))


def test_a_hand_over_broken_by_a_worker_that_dies_just_after_is_a_loader_worker_error(monkeypatch):
    _broken_hand_overs(monkeypatch, kill_after=0.3)
    with pytest.raises(LoaderWorkerError) as caught:
        _all_batches(2)
    assert str(caught.value).startswith('a data-loader worker died: DataLoader worker (pid '), caught.value
    assert str(caught.value).endswith('the last checkpoint is intact: rerun with --resume auto'), caught.value


class _ResetWhileReading(Dataset):
    """A dataset whose 6th item fails to download, say: a ConnectionResetError of the dataset's own."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 5:
            raise ConnectionResetError(errno.ECONNRESET, 'the image server reset the connection')
        return torch.tensor(float(index))


@pytest.mark.parametrize('workers', [0, 2])
def test_a_connection_reset_that_is_no_worker_death_is_not_reported_as_one(monkeypatch, workers):
    """Only a hand-over error with a dead worker is a worker's death: a live worker's broken hand-over and the
    dataset's own errors (in the main process or in a worker) come out unchanged."""
    monkeypatch.setattr(loader_module, 'HAND_OVER_GRACE_S', 0.5)
    with pytest.raises(ConnectionResetError, match='the image server reset the connection'):
        _all_batches(workers, _ResetWhileReading())
    if workers:
        _broken_hand_overs(monkeypatch)
        with pytest.raises(ConnectionResetError, match='Connection reset by peer'):
            _all_batches(workers)


@pytest.mark.parametrize('distributed', [False, True])
def test_preemption_is_agreed_at_every_16th_check_under_ddp_and_at_the_next_one_alone(monkeypatch, distributed):
    """One process stops at the first check after its signal, without a collective. Under DDP the all-reduce (a host
    sync) runs at every 16th check only, and there every rank learns the signal any rank got. Two ranks are faked
    (the all-reduce takes the maximum with the peer's value): the peer gets SIGUSR1 before check 20, this rank
    SIGTERM before check 40."""
    peer = [0]
    reduced = []

    def all_reduce_max(value: int, device: torch.device) -> int:
        reduced.append(value)
        return max(value, peer[0])
    monkeypatch.setattr(preemption, 'all_reduce_max', all_reduce_max)
    monkeypatch.setattr(preemption.dist, 'is_initialized', lambda: distributed)
    notice = preemption.PreemptionNotice()
    answers = []
    for check in range(1, 65):
        if check == 20:
            peer[0] = signal.SIGUSR1
        if check == 40:
            notice.handle(signal.SIGTERM, None)
        answers.append(notice.agreed(torch.device('cpu')))
    if not distributed:
        assert answers == [0] * 39 + [signal.SIGTERM] * 25 and reduced == []
        return
    assert preemption.AGREEMENT_INTERVAL == 16
    assert reduced == [0, 0, signal.SIGTERM, signal.SIGTERM]  # this rank's value, at checks 16, 32, 48, 64 only
    assert {check: answer for check, answer in enumerate(answers, 1) if answer} == {
        32: signal.SIGUSR1, 48: signal.SIGTERM, 64: signal.SIGTERM}
