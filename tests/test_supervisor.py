"""The supervisor's arbiter logic with fake workers, a fake clock and a fake notifier.

No network, no fork: `spawn` and `make_worker` are injected (gunicorn's test_arbiter mocks
os.waitpid/os.fork the same way).
"""

from __future__ import annotations

import io
import logging
import os
import signal

import pytest

from streamtap import config as cfgmod
from streamtap.process import logs
from streamtap.process.capture import CaptureOpenError
from streamtap.process.messages import (
    Eof,
    Ready,
    Reload,
    Reloaded,
    ReloadFailed,
    Stats,
    Stop,
    Stopped,
    Streams,
)
from streamtap.process.messages import Failed as Error
from streamtap.process.notify import Notifier
from streamtap.process.supervisor import HaltServer, Supervisor


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeProc:
    """Stands for WorkerProc: messages/batches are lists the test fills."""

    def __init__(self, index: int, pid: int) -> None:
        self.index, self.pid = index, pid
        self.inbox: list[tuple] = []       # what the worker "sent" us
        self.queue: list[tuple] = []       # stream batches
        self.sent: list[tuple] = []        # what we sent it
        self.code: int | None = None
        self.killed = self.aborted = False
        self.closed = False

    inline = False
    eof = False

    def step(self, timeout):
        pass

    def exitcode(self):
        return self.code

    def abort(self):
        self.aborted = True

    def kill(self):
        self.killed = True
        self.code = -9

    def send(self, msg):
        self.sent.append(msg)
        return self.code is None

    def messages(self):
        out, self.inbox = self.inbox, []
        return out

    def batches(self, limit):
        out, self.queue = self.queue[:limit], self.queue[limit:]
        if out and isinstance(out[-1], Eof):
            self.eof = True
        return [b.streams for b in out if isinstance(b, Streams)]

    def waitables(self):
        return []

    def close(self):
        self.closed = True


class Spawner:
    def __init__(self) -> None:
        self.procs: list[FakeProc] = []
        self.next_pid = 100

    def __call__(self, index, cfg, interface, count):
        self.next_pid += 1
        p = FakeProc(index, self.next_pid)
        p.cfg = cfg
        self.procs.append(p)
        return p

    def current(self, index):
        return [p for p in self.procs if p.index == index][-1]


class FakeNotifier(Notifier):
    def __init__(self, watchdog_usec: int | None = 2_000_000) -> None:
        env = {"WATCHDOG_USEC": str(watchdog_usec)} if watchdog_usec else {}
        self.msgs: list[str] = []
        super().__init__(send=self._record, env=env)

    def _record(self, state):
        self.msgs.append(state.split("\n")[0])
        return True


class Sink:
    def __init__(self, tag="s") -> None:
        self.tag = tag
        self.written: list = []
        self.events: list[str] = []
        self.records = 0

    def open(self):
        self.events.append("open")

    def write(self, batch):
        self.written.extend(batch)
        self.records += len(batch)

    def flush(self):
        self.events.append("flush")

    def close(self):
        self.events.append("close")


def cfg_with(workers=2, **capture):
    capture.setdefault("interface", "eth9")
    return cfgmod.load(None, {"capture": {"workers": workers, **capture}})


def stats(index, **kw):
    d = {"index": index, "pid": 0, "received": 0, "kernel_drops": 0, "interface_drops": 0,
         "packets": 0, "flows_active": 0, "malformed": {}, "streams": {}, "missed_bytes": 0,
         "gaps": 0, "channel_dropped": 0, "last_progress": 0.0}
    d.update(kw)
    return d


def make(workers=2, **kw):
    clock = Clock()
    spawner = Spawner()
    notifier = FakeNotifier()
    sink = Sink()
    sup = Supervisor(cfg_with(workers), interface="eth9", sinks=[sink], notifier=notifier,
                     spawn=spawner, clock=clock, **kw)
    return sup, clock, spawner, notifier, sink


def all_ready(sup, spawner):
    for s in sup.slots:
        p = spawner.current(s.index)
        p.inbox.append(Ready(s.index, p.pid))
    sup.run_pass()


# --------------------------------------------------------------------------- signals (G1)


def test_signal_handler_only_enqueues_then_loop_dispatches(monkeypatch):
    sup, *_ = make()
    called = []
    for name in ("hup", "term", "int", "usr1"):
        monkeypatch.setattr(sup, f"handle_{name}", lambda n=name: called.append(n))
    sup.init_signals()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert called == []                      # the handler did no work
        assert sup.sig_queue == ["HUP", "USR1"]
        assert os.read(sup.pipe[0], 10)          # and woke the loop's wait
        sup.signal(signal.SIGTERM)
        sup.signal(signal.SIGINT)
        sup.dispatch_signals()
        assert called == ["hup", "usr1", "term", "int"]
        assert sup.sig_queue == []
    finally:
        sup.reset_signals()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_sigterm_stops_workers_and_exits_after_they_stopped():
    sup, clock, spawner, notifier, sink = make()
    sup.start_workers()
    all_ready(sup, spawner)
    sup.signal(signal.SIGTERM)
    sup.dispatch_signals()
    assert all(p.sent == [Stop()] for p in spawner.procs)
    assert notifier.msgs[-1] == "STOPPING=1"
    assert not sup.finished()
    for p in spawner.procs:
        p.queue.append(Streams(p.index, [f"open-{p.index}"]))
        p.queue.append(Eof(p.index))
        p.inbox.append(Stopped(p.index))
        p.code = 0
    sup.run_pass()
    assert sup.finished()
    assert sorted(sink.written) == ["open-0", "open-1"]
    assert sup.counters.worker_restarts == 0 and len(spawner.procs) == 2


def test_shutdown_timeout_kills_what_is_left(monkeypatch):
    sup, clock, spawner, notifier, sink = make()
    sup.start_workers()
    all_ready(sup, spawner)
    sup.handle_term()
    spawner.procs[0].code = 0
    clock.t += sup.cfg.capture.shutdown_timeout + 1
    sup.run_pass()
    assert spawner.procs[1].killed
    assert sup.finished()


# --------------------------------------------------------------------------- restarts (G3)


def test_crashing_worker_restarts_with_backoff_and_is_counted():
    sup, clock, spawner, notifier, sink = make()
    sup.start_workers()
    all_ready(sup, spawner)
    sup.pool.heartbeat_timeout = 1e9   # only crashes here, no murders
    delays = []
    for _ in range(8):
        p = spawner.current(1)
        p.code = -11
        sup.run_pass()
        slot = sup.slots[1]
        assert slot.proc is None
        delays.append(slot.restart_at - clock.t)
        clock.t += delays[-1] - 0.01
        sup.run_pass()
        assert slot.proc is None                 # not before its time
        clock.t += 0.02
        sup.run_pass()
        assert slot.proc is spawner.current(1) and slot.proc is not p
        # the new one sends heartbeats, but dies quickly again
        clock.t += 0.5
        spawner.current(1).inbox.append(Ready(1, 0))
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert sup.counters.worker_restarts == 8
    assert sup.state()["worker_restarts"] == 8
    # a worker that lived long enough starts afresh
    clock.t += sup.pool.backoff_reset + 1
    for p in spawner.procs[:1]:
        p.inbox.append(Stats(stats(0)))
    spawner.current(1).inbox.append(Stats(stats(1)))
    sup.run_pass()
    spawner.current(1).code = 1                   # a runtime failure after ready: restart
    sup.run_pass()
    assert sup.slots[1].restart_at - clock.t == 1


@pytest.mark.parametrize("code", [1, 2])
def test_boot_error_halts_with_its_exit_code(code):
    sup, clock, spawner, notifier, sink = make()
    sup.start_workers()
    p = spawner.current(0)
    p.inbox.append(Error(code, "capture: no such device eth9"))
    p.code = code
    with pytest.raises(HaltServer) as ei:
        sup.run_pass()
    assert ei.value.exit_status == code
    assert "no such device" in ei.value.reason
    spawner.current(1).inbox.append(Stopped(1))
    spawner.current(1).code = 0
    sup.halt(ei.value)
    assert sup.exit_status == code
    assert sup.finished()
    assert len(spawner.procs) == 2               # nothing respawned
    assert "READY=1" not in notifier.msgs


def test_boot_error_through_run_loop():
    sup, clock, spawner, notifier, sink = make()

    def spawn(*a):
        p = Spawner.__call__(spawner, *a)
        p.inbox.append(Error(2, "bad filter: syntax error"))
        p.code = 2
        return p

    sup.pool.spawn = spawn
    assert sup.run() == 2
    assert "flush" in sink.events and "close" in sink.events


def test_inprocess_boot_error_returns_its_code():
    class W:
        def __init__(self, *a, **kw):
            pass

        def start(self):
            raise CaptureOpenError("eth9: no such device", exit_code=1)

    notifier = FakeNotifier()
    sup = Supervisor(cfg_with(1), interface="eth9", sinks=[Sink()], notifier=notifier,
                     make_worker=W)
    assert sup.run() == 1
    assert notifier.msgs == ["STOPPING=1"]


# --------------------------------------------------------------------------- heartbeat (G2)


def test_silent_worker_gets_sigabrt_then_sigkill_then_is_restarted(caplog):
    sup, clock, spawner, notifier, sink = make()
    sup.start_workers()
    all_ready(sup, spawner)
    victim = spawner.procs[1]
    for _ in range(11):
        clock.t += 1
        spawner.current(0).inbox.append(Stats(stats(0)))   # worker 0 keeps talking
        sup.run_pass()
    # silent for 11 s > heartbeat_timeout: SIGABRT first, so its stack reaches the log
    assert victim.aborted and not victim.killed
    assert not spawner.procs[0].aborted and not spawner.procs[0].killed
    assert "silent for 11 s: aborting it" in caplog.text
    clock.t += sup.pool.abort_grace - 0.1
    spawner.current(0).inbox.append(Stats(stats(0)))
    sup.run_pass()
    assert not victim.killed                               # the grace is not over
    clock.t += 0.2
    spawner.current(0).inbox.append(Stats(stats(0)))
    sup.run_pass()
    assert victim.killed                                   # survived SIGABRT: SIGKILL
    assert "survived SIGABRT: killing it" in caplog.text
    sup.run_pass()   # reaped (exit -9): restart scheduled after 1 s
    clock.t += 1.01
    spawner.current(0).inbox.append(Stats(stats(0)))
    sup.run_pass()
    assert spawner.current(1) is not victim
    assert sup.counters.worker_restarts == 1


def test_worker_dying_of_sigabrt_is_not_killed_again():
    sup, clock, spawner, notifier, sink = make()
    sup.start_workers()
    all_ready(sup, spawner)
    sup.pool.heartbeat_timeout = 1.0
    clock.t += 1.5
    sup.run_pass()
    victim = spawner.procs[1]
    assert victim.aborted and spawner.procs[0].aborted
    for p in spawner.procs:
        p.code = -signal.SIGABRT                           # faulthandler dumped, it died
    sup.run_pass()
    assert all(not p.killed for p in spawner.procs[:2])
    assert all(s.proc is None and s.restart_at is not None for s in sup.slots)
    clock.t += sup.pool.abort_grace + 1.1
    sup.run_pass()
    assert len(spawner.procs) == 4 and sup.slots[1].aborted_at is None


# --------------------------------------------------------------------------- counters


def test_counters_are_cumulative_over_worker_deaths():
    sup, clock, spawner, notifier, sink = make()
    sup.start_workers()
    all_ready(sup, spawner)
    spawner.current(0).inbox.append(Stats(stats(0, packets=100, received=110,
                                                    streams={"fin": 3}, flows_active=2,
                                                    malformed={"short": 1})))
    spawner.current(1).inbox.append(Stats(stats(1, packets=50, received=50,
                                                    streams={"fin": 1, "rst": 1},
                                                    flows_active=4)))
    sup.run_pass()
    st = sup.state()
    assert st["packets"] == 150 and st["streams"] == {"fin": 4, "rst": 1}
    assert st["flows_active"] == 6
    spawner.current(1).code = -9
    sup.run_pass()
    st = sup.state()
    assert st["packets"] == 150 and st["received"] == 160
    assert st["streams"] == {"fin": 4, "rst": 1}
    assert st["flows_active"] == 2
    assert st["workers"][1]["alive"] is False and st["workers"][1]["packets"] == 50
    clock.t += 1.5
    sup.run_pass()                                     # respawned
    spawner.current(1).inbox.append(Stats(stats(1, packets=7, streams={"fin": 2})))
    sup.run_pass()
    st = sup.state()
    assert st["packets"] == 157 and st["streams"] == {"fin": 6, "rst": 1}
    assert st["worker_restarts"] == 1
    assert st["workers"][1]["packets"] == 57 and st["workers"][1]["alive"] is True
    assert st["malformed"] == {"short": 1}
    assert st["sinks"] == [{"name": "Sink", "type": "Sink", "healthy": True, "queue_depth": 0,
                            "records": {"ok": 0, "retried": 0, "failed": 0, "spooled": 0,
                                        "dropped": 0}}]
    assert set(st) >= {"uptime", "interface", "workers", "flows_active", "streams",
                       "malformed", "missed_bytes", "packets", "worker_restarts",
                       "channel_dropped", "sinks"}


# --------------------------------------------------------------------------- systemd


def test_ready_only_after_every_worker_and_watchdog_only_while_all_alive():
    sup, clock, spawner, notifier, sink = make()
    sup.start_workers()
    clock.t += 2
    sup.run_pass()
    assert notifier.msgs == []                    # nobody ready: no READY, no WATCHDOG
    spawner.current(0).inbox.append(Ready(0, 1))
    sup.run_pass()
    assert "READY=1" not in notifier.msgs
    spawner.current(1).inbox.append(Ready(1, 2))
    sup.run_pass()
    assert notifier.msgs[0] == "READY=1"
    first = notifier.msgs.count("WATCHDOG=1")
    clock.t += 1.0
    sup.run_pass()
    assert notifier.msgs.count("WATCHDOG=1") == first + 1
    spawner.current(1).code = -9                  # a worker died
    sup.run_pass()
    n = notifier.msgs.count("WATCHDOG=1")
    for _ in range(3):
        clock.t += 0.5
        for p in spawner.procs:
            p.inbox.append(Stats(stats(p.index)))
        sup.run_pass()
    assert notifier.msgs.count("WATCHDOG=1") == n  # silent while it is down
    spawner.current(1).inbox.append(Ready(1, 3))
    clock.t += 1.0
    sup.run_pass()
    assert notifier.msgs.count("WATCHDOG=1") == n + 1
    assert notifier.msgs.count("READY=1") == 1     # a restart is not a second READY
    clock.t += 5
    spawner.current(0).inbox.append(Stats(stats(0)))
    spawner.current(1).inbox.append(Stats(stats(1)))
    sup.run_pass()
    assert any(m.startswith("STATUS=") and "packets/s" in m for m in notifier.msgs)


def test_first_ready_carries_status_in_the_same_datagram():
    sup, clock, spawner, notifier, sink = make(load_config=lambda: cfg_with(2),
                                               make_sinks=lambda c: [Sink()])
    sup.start_workers()
    all_ready(sup, spawner)
    # one datagram: systemctl status shows it the moment the unit is up, not 5 s later
    assert notifier.sent[0] == "READY=1\nSTATUS=capturing on eth9, 2 workers"
    sup.handle_hup()                              # a reload's READY=1 needs no STATUS
    for p in spawner.procs:
        p.inbox.append(Reloaded(p.index))
    sup.run_pass()
    assert notifier.sent[-1] == "READY=1"

    inproc = Supervisor(cfg_with(1), interface="eth9", sinks=[Sink()],
                        notifier=FakeNotifier(None), make_worker=InprocWorker)
    inproc.start_workers()
    inproc.run_pass()
    assert inproc.notifier.sent == ["READY=1\nSTATUS=capturing on eth9, 1 worker"]


def test_notifier_ready_with_status_is_one_message():
    got = []
    n = Notifier(send=lambda s: got.append(s) or True, env={})
    assert n.ready("capturing on eth0,\n2 workers") and n.ready()
    assert got == ["READY=1\nSTATUS=capturing on eth0, 2 workers", "READY=1"]


def test_notifier_is_silent_off_systemd_and_in_other_pids(monkeypatch):
    n = Notifier(env={})
    assert n.enabled is False and n.ready() is False and n.watchdog_interval is None
    got = []
    n = Notifier(send=lambda s: got.append(s) or True,
                 env={"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 1.5
    assert n.ready()
    monkeypatch.setattr(os, "getpid", lambda: n.pid + 1)   # as in a forked worker
    assert not n.watchdog()
    assert got == ["READY=1"]
    assert Notifier(env={"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval \
        is None


# --------------------------------------------------------------------------- reload


def test_invalid_config_on_sighup_keeps_the_old_one(caplog):
    from streamtap.cli import UsageError

    def bad():
        raise UsageError("config.yaml:3: capture.snaplen: expected an integer")

    made = []
    sup, clock, spawner, notifier, sink = make(load_config=bad,
                                               make_sinks=lambda c: made.append(c) or [])
    sup.start_workers()
    all_ready(sup, spawner)
    old = sup.cfg
    with caplog.at_level(logging.ERROR, logger="streamtap"):
        sup.signal(signal.SIGHUP)
        sup.dispatch_signals()
    assert sup.cfg is old and sup.sinks == [sink] and made == []
    assert "capture.snaplen" in caplog.text
    assert "RELOADING=1" not in notifier.msgs
    assert all(Reload(old) not in p.sent for p in spawner.procs)
    assert "close" not in sink.events  # the old sink stays


def test_valid_sighup_rebuilds_sinks_and_reloads_workers():
    new_cfg = cfg_with(2, filter="tcp port 80")
    new_sink = Sink("new")
    sup, clock, spawner, notifier, sink = make(load_config=lambda: new_cfg,
                                               make_sinks=lambda c: [new_sink])
    sup.start_workers()
    all_ready(sup, spawner)
    sup.handle_hup()
    assert notifier.msgs[-1] == "RELOADING=1"
    for t in list(sup._closers.values()) + sup._anon_closers:  # the old sink closes off the loop
        t.join(5)
    assert sink.events[-2:] == ["flush", "close"] and new_sink.events == ["open"]
    assert sup.cfg is new_cfg and sup.sinks == [new_sink]
    assert all(p.sent == [Reload(new_cfg)] for p in spawner.procs)
    spawner.current(0).inbox.append(Reloaded(0))
    sup.run_pass()
    assert notifier.msgs[-1] != "READY=1"        # one worker still busy
    spawner.current(1).inbox.append(ReloadFailed(1, "bad filter"))
    sup.run_pass()
    assert notifier.msgs[-1] == "READY=1"
    # a worker restarted later gets the new config
    spawner.current(0).code = -9
    sup.run_pass()
    clock.t += 1.5
    sup.run_pass()
    assert spawner.current(0).cfg is new_cfg


# --------------------------------------------------------------------------- in-process


class InprocWorker:
    def __init__(self, index, cfg, *, interface, fanout, count=None):
        self.index = index
        self.count, self.done, self.steps, self.reloaded = count, False, 0, []

    def start(self):
        pass

    def step(self, timeout=0.1):
        self.steps += 1
        if self.count and self.steps >= self.count:
            self.done = True
        return [f"s{self.steps}"]

    def stats(self):
        return stats(0, packets=self.steps)

    def reload(self, cfg):
        self.reloaded.append(cfg)

    def stop(self):
        return ["open-shutdown"]


def test_inprocess_count_reached_exits_0_after_flushing():
    clock = Clock()
    sink = Sink()
    notifier = FakeNotifier(None)
    sup = Supervisor(cfg_with(1), interface="eth9", count=3,
                     sinks=[sink], notifier=notifier, make_worker=InprocWorker, clock=clock)
    assert sup.run() == 0
    assert sink.written == ["s1", "s2", "s3", "open-shutdown"]
    assert sink.events == ["flush", "close"]
    assert notifier.msgs == ["READY=1"]
    assert sup.state()["packets"] == 3


def test_inprocess_sigterm_flushes_open_streams(monkeypatch):
    sink = Sink()
    notifier = FakeNotifier(None)
    sup = Supervisor(cfg_with(1), interface="eth9",
                     sinks=[sink], notifier=notifier, make_worker=InprocWorker)
    orig = InprocWorker.step

    def step(self, timeout=0.1):
        if self.steps == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, timeout)

    monkeypatch.setattr(InprocWorker, "step", step)
    assert sup.run() == 0
    assert sink.written == ["s1", "s2", "s3", "open-shutdown"]
    assert notifier.msgs == ["READY=1", "STOPPING=1"]


def test_inprocess_reload_and_ingest_delivery():
    new_cfg = cfg_with(1)
    sink2 = Sink("2")
    sup = Supervisor(cfg_with(1), interface="eth9",
                     sinks=[Sink()], notifier=FakeNotifier(None), make_worker=InprocWorker,
                     load_config=lambda: new_cfg, make_sinks=lambda c: [sink2])
    sup.start_workers()
    sup.run_pass()
    sup.handle_hup()
    assert sup.slots[0].proc.worker.reloaded == [new_cfg]
    assert sup.notifier.msgs == ["READY=1", "RELOADING=1", "READY=1"]
    sup.deliver(["ingested"])
    sup.run_pass()
    assert sink2.written == ["ingested"]


def test_a_failing_sink_does_not_stop_delivery():
    class Broken(Sink):
        def write(self, batch):
            raise OSError(28, "No space left on device")

    good = Sink()
    sup, *_ = make()
    sup.sinks = [Broken(), good]
    sup.deliver_streams(["a", "b"])
    assert good.written == ["a", "b"]
    st = sup.state()["sinks"]
    assert st[0]["healthy"] is False and st[0]["records"]["failed"] == 2
    assert st[1]["healthy"] is True


# --------------------------------------------------------------------------- logs


def test_logs_stderr_plain_and_journal_detection(tmp_path):
    cfg = cfg_with(1)
    buf = io.StringIO()
    log = logs.setup(cfg, interface="eth9", stream=buf)
    logging.getLogger("streamtap.process.supervisor").info("hello", extra=logs.fields(worker=1))
    logging.getLogger("streamtap.process.supervisor").debug("hidden")
    assert "INFO: hello" in buf.getvalue() and "hidden" not in buf.getvalue()
    assert logs.fields(worker=1) == {"STREAMTAP_INTERFACE": "eth9", "STREAMTAP_WORKER": 1}
    logs.setup(cfg, verbose=1, stream=buf)
    assert log.level == logging.DEBUG
    logs.setup(cfg, quiet=True, stream=buf)
    assert log.level == logging.WARNING
    f = tmp_path / "x"
    f.write_text("")
    with open(f) as fh:
        st = os.fstat(fh.fileno())
        assert logs.journal_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fh.fileno())
        assert not logs.journal_stderr({"JOURNAL_STREAM": "1:2"}, fh.fileno())
        assert not logs.journal_stderr({}, fh.fileno())
    logs.setup(cfg, stream=io.StringIO())


def test_journal_handler_fields(monkeypatch):
    sent = []
    from systemd import journal

    monkeypatch.setattr(logs, "journal_stderr", lambda env=None, fd=2: True)
    logs.setup(cfg_with(1), interface="eth9")
    h = logging.getLogger("streamtap").handlers[0]
    assert isinstance(h, journal.JournalHandler)
    h.send = lambda *a, **kw: sent.append((a[0], kw))
    logging.getLogger("streamtap.x").warning("worker died", extra=logs.fields(worker=3))
    msg, kw = sent[0]
    assert msg == "worker died"
    assert kw["SYSLOG_IDENTIFIER"] == "streamtap" and kw["STREAMTAP_INTERFACE"] == "eth9"
    assert kw["STREAMTAP_WORKER"] == 3
    logs.setup(cfg_with(1), stream=io.StringIO())


def test_a_stopped_worker_without_eof_is_reported_as_losing_streams(caplog):
    sup, clock, spawner, notifier, sink = make()
    sup.start_workers()
    all_ready(sup, spawner)
    sup.handle_term()
    p0, p1 = spawner.procs
    p0.queue += [Streams(0, ["a"]), Eof(0)]
    p1.queue += [Streams(1, ["b"])]             # its Eof never came: the queue was cut short
    for p in (p0, p1):
        p.inbox.append(Stopped(p.index))
        p.code = 0
    with caplog.at_level(logging.ERROR, logger="streamtap"):
        sup.run_pass()
    assert sup.finished() and sorted(sink.written) == ["a", "b"]
    assert p0.eof and not p1.eof
    assert "worker 1 exited before its last streams arrived" in caplog.text
    assert "worker 0 exited before" not in caplog.text
