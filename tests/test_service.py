"""The systemd packaging (packaging/): unit, install/uninstall scripts, the service as it runs.

Needs root. Nothing here touches the real /opt/streamtap, /etc/streamtap or /etc/systemd: the
scripts take STREAMTAP_PREFIX / _ETC / _UNITDIR / _SYSUSERSDIR / _TMPFILESDIR, all pointed into
one temporary root under /var/tmp (0755, so the service user can reach the venv). What does touch
the system, on purpose: the system user `streamtap` (created once, kept) and the empty
/var/lib/streamtap and /var/log/streamtap (tmpfiles.d). The real default paths are not
installed by a test: that would replace a CI machine's /opt/streamtap, and the override paths
run the very same code.

Service mode: systemd is usually not PID 1 here, so the test runs what systemd would run: the
unit's ExecStart (parsed from the installed unit, %i = a veth), as the unit's User= with only
the unit's AmbientCapabilities (setpriv: ambient + bounding set, no_new_privs for
NoNewPrivileges=, prctl(PR_SET_MDWE) for MemoryDenyWriteExecute= where the kernel has it), with
RUNTIME_/STATE_/LOGS_DIRECTORY owned by that user, NOTIFY_SOCKET bound here and WATCHDOG_USEC,
inside a network namespace. Writes outside those directories fail on plain file permissions
(the user owns nothing else), even without ProtectSystem=strict, which adds a read-only mount.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netns  # noqa: E402
from notifysock import NotifySocket  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "packaging"
UNIT = PKG / "streamtap@.service"
STREAMTAP_DEV = str(Path(sys.executable).with_name("streamtap"))


def _skip_reason() -> str | None:
    if netns.available() is not None:
        return netns.available()
    for tool in ("systemd-analyze", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install systemd util-linux)"
    if not os.access("/usr/bin/python3", os.X_OK):
        return "no /usr/bin/python3 for the service venv"
    return None


pytestmark = pytest.mark.requires(_skip_reason())


def unit_service_section(path: Path) -> dict[str, list[str]]:
    """[Service] of a unit file as key -> values (keys may repeat, as ExecStartPre= does)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """path -> (mtime_ns, sha256) of every file under root, links not followed."""
    snap = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.islink(p):
                digest = "link:" + os.readlink(p)
            else:
                with open(p, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            snap[p] = (st.st_mtime_ns, digest)
    return snap


class Install:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefix = root / "opt"
        self.etc = root / "etc"
        self.unitdir = root / "units"
        self.sysusers = root / "sysusers.d"
        self.tmpfiles = root / "tmpfiles.d"
        self.env = dict(os.environ, STREAMTAP_PREFIX=str(self.prefix),
                        STREAMTAP_ETC=str(self.etc), STREAMTAP_UNITDIR=str(self.unitdir),
                        STREAMTAP_SYSUSERSDIR=str(self.sysusers),
                        STREAMTAP_TMPFILESDIR=str(self.tmpfiles))
        for k in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            self.env.pop(k, None)

    @property
    def unit(self) -> Path:
        return self.unitdir / "streamtap@.service"

    def run(self, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
        p = subprocess.run([str(PKG / script)], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        assert p.returncode == 0, f"{script}: {p.stdout}\n{p.stderr}"
        return p


@pytest.fixture(scope="module")
def inst():
    root = Path(tempfile.mkdtemp(prefix="streamtap-svc-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        i = Install(root)
        i.first = i.run("install.sh")
        yield i
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- the unit


def test_unit_verifies_clean(inst, tmp_path):
    # verify needs ExecStart= to exist: check the unit as installed (same text, paths of the
    # temporary prefix), and as an instance, the way systemd loads it
    shipped = UNIT.read_text()
    expected = shipped.replace("/opt/streamtap", str(inst.prefix)).replace(
        "/etc/streamtap", str(inst.etc))
    assert inst.unit.read_text() == expected
    inst_unit = tmp_path / "streamtap@eth0.service"
    shutil.copy(inst.unit, inst_unit)
    for path in (inst.unit, inst_unit):
        p = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                           text=True, cwd=tmp_path, timeout=60)
        assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), p.stdout + p.stderr
    # and verify does catch a typo (so "clean" means something)
    bad = tmp_path / "streamtap@bad.service"
    bad.write_text(expected.replace("WatchdogSec=", "WatchdogSecs="))
    p = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert "WatchdogSecs" in p.stderr


def test_unit_settings():
    svc = unit_service_section(UNIT)
    one = {k: v[-1] for k, v in svc.items()}
    assert one["Type"] == "notify" and "NotifyAccess" not in one
    assert one["ExecStart"] == "/opt/streamtap/bin/streamtap-service %i"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["WatchdogSec"] == "30" and one["Restart"] == "on-failure"
    assert one["RestartPreventExitStatus"] == "2"
    assert one["User"] == one["Group"] == "streamtap"
    assert one["AmbientCapabilities"] == one["CapabilityBoundingSet"] == "CAP_NET_RAW"
    assert one["RuntimeDirectory"] == "streamtap" and one["RuntimeDirectoryPreserve"] == "yes"
    assert one["StateDirectory"] == one["LogsDirectory"] == "streamtap"
    assert "AF_PACKET" in one["RestrictAddressFamilies"].split()
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                "ProtectControlGroups", "LockPersonality", "MemoryDenyWriteExecute"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert all(v.startswith("-+/usr/sbin/ethtool -K %i ") for v in svc["ExecStartPre"])
    assert one["EnvironmentFile"] == "-/etc/streamtap/%i.env"


def test_shipped_configs_are_valid(tmp_path):
    couch = tmp_path / "eth0-couchdb.yaml"
    text = (PKG / "eth0.yaml").read_text()
    couch.write_text("\n".join(
        line.replace("  #- ", "  - ", 1).replace("  #  ", "    ", 1)
        for line in text.splitlines()))
    for f in (PKG / "eth0.yaml", PKG / "streamtap.yaml", couch):
        p = subprocess.run([STREAMTAP_DEV, "--check-config", "--config", str(f)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (f, p.stderr)
    assert "type: couchdb" in subprocess.run(
        [STREAMTAP_DEV, "--check-config", "--config", str(couch)], capture_output=True,
        text=True, timeout=60).stdout


# --------------------------------------------------------------------------- install


def test_install_then_again_changes_nothing(inst):
    out = inst.first.stdout
    assert "installing streamtap" in out and "nothing to do" not in out
    assert (inst.prefix / "bin" / "streamtap").exists()
    assert os.access(inst.prefix / "bin" / "streamtap-service", os.X_OK)
    assert pwd.getpwnam("streamtap").pw_dir == "/var/lib/streamtap"
    assert (inst.sysusers / "streamtap.conf").exists()
    assert (inst.tmpfiles / "streamtap.conf").exists()
    for name in ("streamtap.yaml", "eth0.yaml.example", "eth0.env.example"):
        assert (inst.etc / name).exists(), name
    assert oct((inst.etc / "eth0.env.example").stat().st_mode & 0o777) == "0o600"
    # an operator's edit survives a reinstall
    conf = inst.etc / "streamtap.yaml"
    conf.write_text(conf.read_text() + "# operator was here\n")
    before = snapshot(inst.root)
    again = inst.run("install.sh")
    assert "nothing to do" in again.stdout, again.stdout
    assert "installed" not in again.stdout and "installing" not in again.stdout
    assert snapshot(inst.root) == before
    assert conf.read_text().endswith("# operator was here\n")


# --------------------------------------------------------------------------- service mode


class Notify(NotifySocket):
    """The service's NOTIFY_SOCKET; the service user must be able to send to it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode=0o777)

    def wait(self, prefix: str, proc: subprocess.Popen, timeout: float = 15) -> None:
        ok = netns.wait_for(lambda: any(m.startswith(prefix) for m in self.lines())
                            or proc.poll() is not None, timeout)
        assert ok and any(m.startswith(prefix) for m in self.lines()), (prefix, self.lines())


def _mdwe_supported() -> bool:
    code = ("import ctypes, sys; "
            "sys.exit(ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0)")
    return subprocess.run(["/usr/bin/python3", "-c", code]).returncode == 0


MDWE_EXEC = ("import ctypes, os, sys\n"
             "assert ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) == 0\n"
             "os.execv(sys.argv[1], sys.argv[1:])\n")


class Service:
    """The unit's ExecStart, run the way systemd would, in net.ns_a with %i = net.veth_a."""

    def __init__(self, inst: Install, net: netns.VethPair, run_root: Path) -> None:
        svc = unit_service_section(inst.unit)
        self.user = svc["User"][-1]
        pw = pwd.getpwnam(self.user)
        self.dirs = {}
        for var in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY", "LOGS_DIRECTORY"):
            d = run_root / var.split("_")[0].lower()
            d.mkdir(mode=0o750)
            os.chown(d, pw.pw_uid, pw.pw_gid)
            self.dirs[var] = d
        self.notify = Notify(run_root / "notify.sock")
        argv = [a.replace("%i", net.veth_a) for a in shlex.split(svc["ExecStart"][-1])]
        caps = [c.lower().removeprefix("cap_")
                for c in svc["AmbientCapabilities"][-1].split()]
        setpriv = ["setpriv", f"--reuid={self.user}", f"--regid={svc['Group'][-1]}",
                   "--clear-groups", "--inh-caps=-all," + ",".join(f"+{c}" for c in caps),
                   "--ambient-caps=" + ",".join(f"+{c}" for c in caps),
                   "--bounding-set=-all," + ",".join(f"+{c}" for c in caps)]
        if svc.get("NoNewPrivileges", ["no"])[-1] == "yes":
            setpriv.append("--nnp")
        if svc.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes" and _mdwe_supported():
            argv = ["/usr/bin/python3", "-c", MDWE_EXEC, *argv]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "NOTIFY_SOCKET": self.notify.path, "WATCHDOG_USEC": "2000000",
               **{k: str(v) for k, v in self.dirs.items()}}
        self.err_path = run_root / "stderr.txt"
        self._err = open(self.err_path, "w")  # noqa: SIM115
        self.proc = net.popen(net.ns_a, ["env", "-i", *(f"{k}={v}" for k, v in env.items()),
                                         *setpriv, *argv],
                              stdout=subprocess.DEVNULL, stderr=self._err)

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.notify.close()
        self._err.close()


@pytest.fixture(scope="module")
def net():
    with netns.VethPair() as n:
        n.server = n.start_server()
        yield n


@pytest.fixture
def service(inst, net, tmp_path):
    started: list[Service] = []
    run_root = inst.root / f"run-{len(list(inst.root.glob('run-*')))}"
    run_root.mkdir(mode=0o755)

    def start() -> Service:
        s = Service(inst, net, run_root)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def test_service_notify_capture_and_stop(inst, net, service):
    # the fallback config (no /etc/streamtap/IFACE.yaml): shipped with sinks: [], so the
    # wrapper adds a per-interface JSONL file in LOGS_DIRECTORY; 2 workers to keep it quick
    conf = inst.etc / "streamtap.yaml"
    text = conf.read_text()
    assert "\n  workers: 0\n" in text
    conf.write_text(text.replace("\n  workers: 0\n", "\n  workers: 2\n"))
    s = service()
    s.notify.wait("READY=1", s.proc)
    assert s.notify.ready_datagram() == f"READY=1\nSTATUS=capturing on {net.veth_a}, 2 workers"
    s.notify.wait("WATCHDOG=1", s.proc, timeout=5)
    sock = s.dirs["RUNTIME_DIRECTORY"] / f"{net.veth_a}.sock"
    assert sock.exists(), s.stderr()
    conns = [(net.ip4_b, 3000, 5000), (net.ip6_b, 20_000, 100), (net.ip4_b, 8, 0)]
    results = net.run_client(conns)
    out = s.dirs["LOGS_DIRECTORY"] / f"{net.veth_a}.jsonl"

    def records() -> list[dict]:
        if not out.exists():
            return []
        recs = []
        for line in out.read_text().splitlines():
            with contextlib.suppress(ValueError):
                recs.append(json.loads(line))
        return recs

    assert netns.wait_for(lambda: len(records()) >= len(results), 20), s.stderr()
    s.notify.wait("STATUS=", s.proc, timeout=8)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(20) == 0, s.stderr()
    time.sleep(0.2)
    lines = s.notify.lines()
    assert lines.count("READY=1") == 1 and lines[-1] == "STOPPING=1", lines
    # every message from the main pid: the wrapper exec()ed, no NotifyAccess=all needed
    assert {pid for pid, _m in s.notify.msgs} == {s.proc.pid}
    recs = records()
    ports = {r["port"] for r in results}
    assert {r["source"]["port"] for r in recs} >= ports
    for c in results:
        (r,) = [r for r in recs if r["source"]["port"] == c["port"]]
        assert r["source"]["bytes"] == c["sent_len"]
        assert r["destination"]["bytes"] == c["recv_len"]
    st = out.stat()
    assert pwd.getpwuid(st.st_uid).pw_name == s.user
    assert "streamtap-service:" not in s.stderr()  # no wrapper error
    assert "Traceback" not in s.stderr()


@pytest.mark.parametrize("where", ["etc", "prefix"])
def test_service_cannot_write_outside_its_directories(inst, net, service, where):
    # A sink pointed outside the unit's directories: the daemon's sinks open lazily behind
    # their runner, so the open fails with EACCES at the first batch, is retried with backoff
    # (logged), and the records wait in the spool under STATE_DIRECTORY; nothing is written
    # at the target. (Plain file permissions: the service user owns only its directories.)
    target = {"etc": Path(f"/etc/streamtap-test-{os.getpid()}.jsonl"),
              "prefix": inst.prefix / "streams.jsonl"}[where]
    per_iface = inst.etc / f"{net.veth_a}.yaml"
    per_iface.write_text(f"capture:\n  workers: 1\nsinks:\n  - type: jsonl\n"
                         f"    path: {target}\n")
    try:
        s = service()
        s.notify.wait("READY=1", s.proc)
        net.run_client([(net.ip4_b, 500, 500)])
        assert netns.wait_for(lambda: "Permission denied" in s.stderr(), 15), s.stderr()
        assert str(target) in s.stderr()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(20) == 0, s.stderr()
        assert not target.exists()
        spool = s.dirs["STATE_DIRECTORY"] / net.veth_a / "spool" / "jsonl"
        assert spool.is_dir() and any(p.stat().st_size for p in spool.rglob("*") if p.is_file())
    finally:
        per_iface.unlink()
        with contextlib.suppress(FileNotFoundError):
            target.unlink()


# --------------------------------------------------------------------------- uninstall (last)


def test_uninstall_keeps_data_and_is_idempotent(inst):
    data = Path("/var/lib/streamtap")
    logs = Path("/var/log/streamtap")
    out = inst.run("uninstall.sh").stdout
    assert "removed" in out
    assert not inst.prefix.exists() and not inst.unit.exists()
    assert not (inst.sysusers / "streamtap.conf").exists()
    assert not (inst.tmpfiles / "streamtap.conf").exists()
    assert (inst.etc / "streamtap.yaml").exists()
    assert data.is_dir() and logs.is_dir()
    pwd.getpwnam("streamtap")
    assert "nothing to do" in inst.run("uninstall.sh").stdout
