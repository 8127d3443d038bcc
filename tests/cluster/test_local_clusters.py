"""The local cluster helpers of ``cluster/`` for real: ``local_cluster.py`` (a Ray
head and worker nodes) and ``dask/local_cluster.py`` start, serve and stop their own
processes and nothing else.

The rest of the suite shares one in-process Ray (``conftest.ray_cluster``), so these
tests never call ``ray.init``/``ray.shutdown`` here and never ``ray stop``: every
cluster runs in subprocesses with its own folder and ports, and cleanup signals
only processes recorded as started by that test.
"""

from __future__ import annotations

import contextlib
import json
import os
import py_compile
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster.common import CLUSTER

BIN = Path(sys.executable).parent
PY_HELPERS = [CLUSTER / "local_cluster.py", CLUSTER / "dask" / "local_cluster.py"]
LINUX_PROC = Path("/proc/self/environ").exists()


@pytest.mark.parametrize("path", PY_HELPERS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_python_helpers_compile_and_help(path: Path, tmp_path: Path) -> None:
    py_compile.compile(str(path), doraise=True, cfile=str(tmp_path / "helper.pyc"))
    out = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_one_local_ray_cluster_helper() -> None:
    """The bash twin of local_cluster.py is gone; nothing refers to it any more."""
    assert not (CLUSTER / "local_cluster.sh").exists()
    for path in [CLUSTER / "README.md", CLUSTER.parent / "README.md"]:
        assert "local_cluster.sh" not in path.read_text(), path


# -- the helpers for real -------------------------------------------------------------


def _start_time(pid: int) -> bytes | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == b"Z" else fields[19]  # zombies count as gone


def processes_of(folder: str) -> dict[int, bytes]:
    """Live processes of the Ray cluster in ``folder`` (a path below it in their command
    line, or ``folder`` as their RAY_TMPDIR), and their descendants, as {pid: start time}."""
    target = folder.encode()
    markers = {b"RAY_TMPDIR=" + target}
    roots: set[int] = set()
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z":
                continue
            children.setdefault(int(fields[1]), []).append(pid)
            cmdline = (entry / "cmdline").read_bytes()
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except (OSError, IndexError, ValueError):
            continue
        if target + b"/" in cmdline or markers & environ:
            roots.add(pid)
    found: dict[int, bytes] = {}
    todo = list(roots)
    while todo:
        pid = todo.pop()
        start = _start_time(pid)
        if pid not in found and start is not None:
            found[pid] = start
            todo.extend(children.get(pid, []))
    return found


def still_alive(recorded: dict[int, bytes]) -> list[int]:
    return [pid for pid, start in recorded.items() if _start_time(pid) == start]


def describe(pids: list[int]) -> str:
    """``ps``-like lines for an assertion message."""
    lines = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100]
            lines.append(f"{pid} ppid={int(stat[1])} {stat[0].decode()} {cmd.decode()}")
        except OSError:
            lines.append(f"{pid} (gone)")
    return "\n".join(lines)


def kill_recorded(recorded: dict[int, bytes]) -> None:
    """SIGKILL what this test started and is still running (pid and start time match)."""
    for pid in still_alive(recorded):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_"))}
    env.pop("RAY_TMPDIR", None)
    env.update(RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def alive_nodes(exports: dict[str, str]) -> int:
    """Alive nodes as the README asks for them: `ray list nodes` with the helper's exports."""
    out = subprocess.run(
        [str(BIN / "ray"), "list", "nodes", "--filter", "state=ALIVE", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(**exports),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return len(json.loads(out.stdout))


needs_proc = pytest.mark.skipif(not LINUX_PROC, reason="process bookkeeping needs Linux /proc")
needs_ray_cli = pytest.mark.skipif(not (BIN / "ray").exists(), reason="no ray CLI beside python")


@needs_proc
@needs_ray_cli
def test_local_cluster_py_two_nodes() -> None:
    """The foreground helper: 2 alive nodes while it runs, nothing left after Ctrl-C."""
    base = tempfile.mkdtemp(prefix="vcp", dir="/tmp")
    folder, ready = f"{base}/r", Path(base) / "ready.json"
    env = clean_env()
    env.pop("RAY_AUTH_MODE", None)
    cmd = [
        sys.executable,
        str(CLUSTER / "local_cluster.py"),
        "--nodes",
        "1",
        "--port",
        "0",
        "--dashboard-port",
        "0",
        "--object-store-mb",
        "100",
        "--temp-dir",
        folder,
        "--ready-file",
        str(ready),
    ]
    log = Path(base) / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=base, start_new_session=True
        )
    recorded: dict[int, bytes] = {}
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no cluster after 180 s: " + log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written in one go; let the write finish
        info = json.loads(ready.read_text())
        recorded = processes_of(folder)
        assert info["nodes"] == 2 and info["dashboard_url"].startswith("http://127.0.0.1:")
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", log.read_text(), re.M))
        assert exports == {"RAY_ADDRESS": info["dashboard_url"], "RAY_AUTH_MODE": "token"}
        assert alive_nodes(exports) == 2

        recorded |= processes_of(folder)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 30  # Ray's own helpers exit once their parent is gone
        while still_alive(recorded) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = still_alive(recorded)
        assert not left, "processes outlived the helper:\n" + describe(left)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_recorded(recorded | processes_of(folder))
        shutil.rmtree(base, ignore_errors=True)


def test_dask_local_cluster_serves_and_stops() -> None:
    base = tempfile.mkdtemp(prefix="vcd")
    address_file = Path(base) / "address"
    cmd = [
        sys.executable,
        str(CLUSTER / "dask" / "local_cluster.py"),
        "--workers",
        "1",
        "--memory-limit",
        "1GiB",
        "--port",
        "0",
        "--address-file",
        str(address_file),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=base, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists() or not address_file.read_text().strip():
            assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "no dask scheduler after 120 s"
            time.sleep(0.2)
        address = address_file.read_text().strip()
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", address)
        code = (
            "import sys; from distributed import Client; c = Client(sys.argv[1], timeout=30); "
            "print(c.submit(sum, [1, 2, 3]).result()); c.close()"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and out.stdout.strip().endswith("6"), out.stderr[-2000:]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        output = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        assert f"scheduler: {address}" in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)
