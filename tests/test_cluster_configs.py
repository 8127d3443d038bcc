"""The deployment folder ``cluster/``: manifests parse and carry what KubeRay and the
dask operator need; the local cluster helpers start, report and stop their own
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
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
BIN = Path(sys.executable).parent
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
PY_HELPERS = [CLUSTER / "local_cluster.py", CLUSTER / "dask" / "local_cluster.py"]
LINUX_PROC = Path("/proc/self/environ").exists()


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load(path)
    assert len(docs) == 1, f"{path.name}: expected one document, got {len(docs)}"
    return docs[0]


def secret_keys() -> set[tuple[str, str]]:
    keys = set()
    for doc in load(KUBERAY / "secrets.example.yaml"):
        assert doc["kind"] == "Secret" and doc["apiVersion"] == "v1"
        for field in ("stringData", "data"):
            keys |= {(doc["metadata"]["name"], k) for k in doc.get(field) or {}}
    return keys


def secret_refs(node: Any) -> Iterator[dict[str, Any]]:
    """Every ``secretKeyRef`` anywhere below ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "secretKeyRef":
                yield value
            else:
                yield from secret_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from secret_refs(item)


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (``16Gi``, ``500M``, ``2``) as a number."""
    m = re.fullmatch(r"([0-9.]+)(|k|M|G|Ki|Mi|Gi)", str(text))
    assert m, f"unexpected quantity {text!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def check_pod(pod: dict[str, Any], start_params: dict[str, Any]) -> dict[str, Any]:
    """Checks shared by every Ray pod template; returns its Ray container."""
    spec = pod["spec"]
    container = spec["containers"][0]
    assert container["name"] and container["image"], "the Ray container needs a name and an image"
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts") or []}
    for mount in mounts.values():
        assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"
    shm = mounts.get("/dev/shm")
    assert shm, "Ray's object store needs /dev/shm mounted"
    empty_dir = volumes[shm["name"]].get("emptyDir")
    assert empty_dir and empty_dir.get("medium") == "Memory", "/dev/shm must be emptyDir Memory"
    if "object-store-memory" in start_params and "sizeLimit" in empty_dir:
        assert quantity(start_params["object-store-memory"]) < quantity(empty_dir["sizeLimit"])
    limits = container["resources"]["limits"]
    requests = container["resources"].get("requests") or {}
    assert "cpu" in limits and "memory" in limits
    for name, value in requests.items():
        assert quantity(value) <= quantity(limits[name]), f"request {name} above its limit"
    env = env_of(container)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
    return container


def check_ray_cluster_spec(spec: dict[str, Any], *, token_from_secret: bool) -> None:
    """What KubeRay needs of a RayClusterSpec, plus this project's conventions."""
    assert spec["rayVersion"] == version("ray"), "rayVersion must match the Ray of the image"
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52), "token auth"
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        assert isinstance(params, dict)
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams are strings"
    head_container = check_pod(head["template"], head["rayStartParams"])
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265} <= ports, "the head serves the GCS (6379) and the job server (8265)"
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert head["rayStartParams"].get("num-gpus") == "0"

    containers = [head_container]
    assert groups, "at least one worker group"
    assert len({g["groupName"] for g in groups}) == len(groups), "groupName must be unique"
    for group in groups:
        lo, n, hi = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert all(isinstance(x, int) for x in (lo, n, hi))
        assert 0 <= lo <= n <= hi, f"{group['groupName']}: want min <= replicas <= max"
        container = check_pod(group["template"], group["rayStartParams"])
        containers.append(container)
    gpu = [c for c in containers[1:] if "nvidia.com/gpu" in c["resources"]["limits"]]
    assert gpu, "a GPU worker group"
    for container in gpu:
        limit = container["resources"]["limits"]["nvidia.com/gpu"]
        assert int(limit) >= 1
        request = container["resources"].get("requests", {}).get("nvidia.com/gpu", limit)
        assert request == limit, "Kubernetes wants GPU requests equal to limits"

    if token_from_secret:  # RAY_AUTH_MODE/RAY_AUTH_TOKEN by hand, the same on every container
        refs = set()
        for container in containers:
            env = env_of(container)
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            refs.add((ref["name"], ref["key"]))
        assert len(refs) == 1, "head and workers must share one token"
        assert refs <= secret_keys(), "RAY_AUTH_TOKEN's Secret is in secrets.example.yaml"
    else:  # KubeRay makes and injects the token (and uses it to poll the job)
        assert spec["authOptions"]["mode"] == "token"
        for container in containers:
            assert "RAY_AUTH_TOKEN" not in env_of(container), "authOptions injects it"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_manifest_parses(path: Path) -> None:
    docs = load(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
        known = secret_keys()
        for ref in secret_refs(doc):
            assert (ref["name"], ref["key"]) in known, f"{ref} is not in secrets.example.yaml"


def test_manifests_found() -> None:
    names = {str(p.relative_to(CLUSTER)) for p in YAML_FILES}
    assert {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/secrets.example.yaml",
        "dask/daskcluster.yaml",
    } <= names


def test_secrets_are_placeholders() -> None:
    docs = {d["metadata"]["name"]: d for d in load(KUBERAY / "secrets.example.yaml")}
    assert "REPLACE" in docs["vitcnn-ray-auth"]["stringData"]["auth_token"]
    store = docs["vitcnn-object-store"]["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(store)
    assert "REPLACE" in store["AWS_SECRET_ACCESS_KEY"]


def test_raycluster() -> None:
    doc = load_one(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"], token_from_secret=True)


def test_rayjob() -> None:
    doc = load_one(KUBERAY / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["vitcnn", "extract"]
    assert "--resume" in argv and "--overwrite" not in argv, "a re-run must continue, not restart"
    from vitcnn_store.cli import build_parser  # argparse only

    args = build_parser().parse_args(argv[1:])  # the entrypoint is a valid `vitcnn extract`
    assert args.resume and args.store.startswith("s3://"), "workers need a shared store"
    assert spec["shutdownAfterJobFinishes"] is True
    for field in ("ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds"):
        assert isinstance(spec[field], int) and spec[field] >= 0, field
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert {"pip", "working_dir", "py_modules"} & set(runtime_env)
    cluster = spec["rayClusterSpec"]
    check_ray_cluster_spec(cluster, token_from_secret=False)
    # The cluster fits the job: GPUs and CPUs of the worker groups.
    gpus = cpus = 0.0
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
        cpus += group["replicas"] * quantity(limits["cpu"])
    assert args.workers * args.gpus_per_worker <= gpus
    assert args.workers * args.cpus_per_worker <= cpus
    # The head mounts what --images names (the driver lists the folder).
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(args.images.startswith(m["mountPath"]) for m in head["volumeMounts"])


def test_dask_manifest() -> None:
    doc = load_one(CLUSTER / "dask" / "daskcluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    name = doc["metadata"]["name"]
    worker, scheduler = doc["spec"]["worker"], doc["spec"]["scheduler"]
    assert isinstance(worker["replicas"], int) and worker["replicas"] >= 1
    w = worker["spec"]["containers"][0]
    assert w["image"] and w["args"][:2] == ["dask", "worker"]
    assert "$(DASK_WORKER_NAME)" in w["args"], "the operator names workers through this"
    assert "--memory-limit" in w["args"]
    s = scheduler["spec"]["containers"][0]
    assert s["image"] == w["image"], "scheduler and workers must run the same versions"
    assert s["args"][:2] == ["dask", "scheduler"]
    ports = {p["name"]: p["containerPort"] for p in s["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}, "port names the operator uses"
    service = scheduler["service"]
    assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    assert {p["targetPort"] for p in service["ports"]} <= set(ports)
    assert service["type"] == "ClusterIP"
    for container in (w, s):
        env = env_of(container)
        assert "secretKeyRef" in env["AWS_ACCESS_KEY_ID"]["valueFrom"]


def test_shell_script_syntax_and_addresses() -> None:
    script = CLUSTER / "local_cluster.sh"
    assert os.access(script, os.X_OK), "local_cluster.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    ips = set(re.findall(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])", text))
    assert ips <= {"127.0.0.1"}, f"addresses other than loopback: {ips}"
    assert not re.search(r'"\$RAY"\s+stop|^\s*ray\s+stop', text, re.M), "never `ray stop`"
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(script)], check=True)


@pytest.mark.parametrize("path", PY_HELPERS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_python_helpers_compile_and_help(path: Path, tmp_path: Path) -> None:
    py_compile.compile(str(path), doraise=True, cfile=str(tmp_path / "helper.pyc"))
    out = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


# -- the helpers for real -------------------------------------------------------------


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port(pair: bool = False) -> int:
    """A free TCP port (with ``pair``: one whose successor is free too)."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = int(s.getsockname()[1])
        if not pair or (port < 65535 and _is_free(port + 1)):
            return port


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
    markers = {b"RAY_TMPDIR=" + target, b"VITCNN_RAY_CLUSTER=" + target}
    roots, children = set(), {}
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


def alive_nodes(dashboard_url: str) -> int:
    """Alive nodes seen through the job server, asked from a subprocess."""
    code = (
        "import sys; from ray.util.state import list_nodes; "
        "print(len(list_nodes(address=sys.argv[1], filters=[('state', '=', 'ALIVE')])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, dashboard_url],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(RAY_AUTH_MODE="token"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not LINUX_PROC, reason="process bookkeeping needs Linux /proc")
needs_ray_cli = pytest.mark.skipif(not (BIN / "ray").exists(), reason="no ray CLI beside python")


@needs_proc
@needs_ray_cli
def test_local_cluster_sh_up_status_down() -> None:
    """`up 1` makes a 2-node cluster; `status` sees it; `down` stops it and nothing else."""
    base = tempfile.mkdtemp(prefix="vcr", dir="/tmp")  # short: Ray's socket paths are long
    folder = f"{base}/c"
    dashboard = free_port()
    env = clean_env(
        RAY=str(BIN / "ray"),
        VITCNN_RAY_DIR=folder,
        VITCNN_RAY_PORT=str(free_port()),
        VITCNN_RAY_DASHBOARD_PORT=str(dashboard),
        VITCNN_RAY_CLIENT_PORT=str(free_port()),
        VITCNN_RAY_AGENT_PORT=str(free_port(pair=True)),
        VITCNN_RAY_OBJECT_STORE_MB="100",
    )
    env.pop("RAY_AUTH_MODE", None)  # the script's default: token

    def script(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(CLUSTER / "local_cluster.sh"), *args],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
        )  # fmt: skip

    # Bystanders that `down` must leave alone: like a user's shell, one has VITCNN_RAY_DIR;
    # its RAY_TMPDIR shares the cluster folder's prefix.
    bystanders = [
        subprocess.Popen(["sleep", "300"], env={**env, "RAY_TMPDIR": folder + "x"}),
        subprocess.Popen(["sleep", "300"]),
    ]
    recorded: dict[int, bytes] = {}
    try:
        up = script("up", "1")
        recorded = processes_of(folder)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Ray cluster up: 2 node(s)" in up.stdout
        assert f"export RAY_ADDRESS=http://127.0.0.1:{dashboard}" in up.stdout
        raylets = [
            pid for pid in recorded
            if b"raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]  # fmt: skip
        assert len(raylets) == 2, "a head and one worker node, each its own raylet"
        assert alive_nodes(f"http://127.0.0.1:{dashboard}") == 2

        status = script("status", timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "2 node(s) alive" in status.stdout
        assert "0 submitted job(s)" in status.stdout

        again = script("up", "1", timeout=60)
        assert again.returncode != 0 and "already running" in again.stderr

        recorded |= processes_of(folder)
        down = script("down", timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        left = still_alive(recorded)
        assert not left, "down left processes of the cluster running:\n" + describe(left)
        assert processes_of(folder) == {}
        assert not Path(folder).exists()
        assert all(p.poll() is None for p in bystanders), "down stopped a bystander"
        assert script("status", timeout=60).returncode != 0
    finally:
        if still_alive(recorded) or processes_of(folder):
            script("down", timeout=120)
            kill_recorded(recorded | processes_of(folder))
        for p in bystanders:
            p.kill()
            p.wait()
        shutil.rmtree(base, ignore_errors=True)


@needs_proc
def test_local_cluster_py_two_nodes() -> None:
    """The foreground helper: 2 alive nodes while it runs, nothing left after Ctrl-C."""
    base = tempfile.mkdtemp(prefix="vcp", dir="/tmp")
    folder, ready = f"{base}/r", Path(base) / "ready.json"
    env = clean_env()
    env.pop("RAY_AUTH_MODE", None)
    cmd = [
        sys.executable, str(CLUSTER / "local_cluster.py"), "--nodes", "1", "--port", "0",
        "--dashboard-port", "0", "--object-store-mb", "100", "--temp-dir", folder,
        "--ready-file", str(ready),
    ]  # fmt: skip
    log = Path(base) / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=base,
                                start_new_session=True)  # fmt: skip
    recorded: dict[int, bytes] = {}
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no cluster after 180 s: " + log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(0.2)  # the file is written in one go; let the write finish
        info = json.loads(ready.read_text())
        recorded = processes_of(folder)
        assert info["nodes"] == 2 and info["dashboard_url"].startswith("http://127.0.0.1:")
        assert alive_nodes(info["dashboard_url"]) == 2
        assert "export RAY_ADDRESS=" + info["dashboard_url"] in log.read_text()

        recorded |= processes_of(folder)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 30  # Ray's own helpers exit once their parent is gone
        while still_alive(recorded) and time.monotonic() < deadline:
            time.sleep(0.5)
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
        sys.executable, str(CLUSTER / "dask" / "local_cluster.py"), "--workers", "1",
        "--memory-limit", "1GiB", "--port", "0", "--address-file", str(address_file),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=base,
                            start_new_session=True)  # fmt: skip
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
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
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
