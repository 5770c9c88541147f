"""Process plumbing: the forkserver gives workers a clean process (fork safety), and a real
spawned worker speaks the typed protocol. No namespace needed: the interface does not exist."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

from streamtap import config as cfgmod
from streamtap.process import procs
from streamtap.process.messages import Failed

HELD = threading.Lock()  # taken by a thread of the parent, as a sink runner holds its locks


def take_held_lock() -> None:
    """In the child: a lock the parent's other thread held at fork time is never released."""
    os._exit(0 if HELD.acquire(timeout=2) else 1)


def _child_exit_code(method: str) -> int:
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        with HELD:
            taken.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    taken.wait(5)
    try:
        p = mp.get_context(method).Process(target=take_held_lock)
        p.start()
        p.join(10)
        return p.exitcode
    finally:
        release.set()
        t.join()


def test_a_fork_inherits_a_held_lock_the_forkserver_does_not():
    # the hazard (issue 9, item 5): fork while another thread holds a lock, and the child
    # blocks on it forever; the forkserver was started before the thread and forks itself
    procs.start_forkserver()
    assert _child_exit_code("fork") == 1
    assert _child_exit_code(procs.START_METHOD) == 0


def test_spawned_worker_reports_boot_error_and_exit_code():
    cfg = cfgmod.load(None, {"capture": {"interface": "nosuch0", "workers": 2}})
    w = procs.spawn_process(0, cfg, "nosuch0", None)
    try:
        assert w.process.sentinel in w.waitables()  # its death wakes the supervisor's wait
        end = time.monotonic() + 15
        while w.exitcode() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert w.exitcode() == 1
        msgs = w.messages()
        assert len(msgs) == 1 and isinstance(msgs[0], Failed), msgs
        assert msgs[0].exit_code == 1 and "nosuch0" in msgs[0].message
        assert w.batches(10) == []
    finally:
        w.kill()
        w.close()


def test_backoff_sequence():
    assert [procs.backoff_delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert procs.backoff_delay(0) == 0


ABORT_SCRIPT = """
import time
from streamtap.process import procs
from streamtap.process.procs import WorkerProc
import multiprocessing as mp
if __name__ == "__main__":
    procs.start_forkserver()
    ctx = mp.get_context(procs.START_METHOD)
    p = ctx.Process(target=procs.child_entry, args=(time.sleep, (30,), {}))
    p.start()
    time.sleep(1.0)
    w = WorkerProc(p, None, None, 0)
    w.abort()
    p.join(10)
    print("exit", p.exitcode)
"""


def test_sigabrt_puts_the_workers_stack_in_the_log(tmp_path):
    # murder_workers' first step: the hung worker's faulthandler writes where it was stuck
    script = tmp_path / "abort.py"
    script.write_text(ABORT_SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"exit {-signal.SIGABRT}", (r.stdout, r.stderr)
    assert "Fatal Python error: Aborted" in r.stderr
    assert "in child_entry" in r.stderr, r.stderr
