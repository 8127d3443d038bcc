#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine, for trying out job submission.
#
#   cluster/local_cluster.sh up [N]   head + N worker "nodes" (default N=2), then print the exports
#   cluster/local_cluster.sh status   nodes, resources and jobs of this cluster
#   cluster/local_cluster.sh env      the export lines again (eval "$(cluster/local_cluster.sh env)")
#   cluster/local_cluster.sh down     stop this cluster, and only this one
#
# Ray 2.60 runs several raylets on one machine: each `ray start` below is one node
# (its own raylet, object store and dashboard agent); they share the session
# directory under VITCNN_RAY_DIR. The job server (dashboard) listens on 127.0.0.1
# only. Ray's gRPC services (GCS, raylets) listen on all interfaces whatever the
# flags (Ray swaps loopback for the node's address); token auth (RAY_AUTH_MODE=token,
# token in ~/.ray/auth_token) guards them, so keep the machine behind a firewall.
#
# `down` never runs `ray stop` (that kills every Ray process of the user, other
# clusters and test sessions included). Every process of this cluster inherits
# VITCNN_RAY_CLUSTER=<its dir> from `up`, and Ray's own name paths under that dir;
# `down` signals the processes carrying either (found through Linux /proc) and their
# descendants: SIGTERM, then SIGKILL after VITCNN_RAY_STOP_GRACE seconds.
#
# Settings (environment):
#   VITCNN_RAY_DIR             state, logs and Ray temp dir (default /tmp/vitcnn-ray-$USER);
#                              keep it short: Ray's socket paths must fit in 107 bytes
#   VITCNN_RAY_PORT            GCS port (default 6379)
#   VITCNN_RAY_DASHBOARD_PORT  job server / dashboard port (default 8265)
#   VITCNN_RAY_CLIENT_PORT     Ray Client server port (default 10001)
#   VITCNN_RAY_AGENT_PORT      dashboard agent port of the head; node i uses +i (default 52365)
#   VITCNN_RAY_HEAD_CPUS       CPUs of the head node (default 1)
#   VITCNN_RAY_HEAD_GPUS       GPUs of the head node (default: detected); worker nodes get 0,
#                              so one machine's GPUs are counted once
#   VITCNN_RAY_WORKER_CPUS     CPUs of each worker node (default 1)
#   VITCNN_RAY_OBJECT_STORE_MB object store per node in MiB (default 512)
#   VITCNN_RAY_STOP_GRACE      seconds between SIGTERM and SIGKILL in `down` (default 5)
#   RAY_AUTH_MODE              token (default) or disabled
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
if [ -n "${RAY:-}" ]; then
    :
elif [ -x "$ROOT/.venv/bin/ray" ]; then
    RAY="$ROOT/.venv/bin/ray"
else
    RAY="$(command -v ray || true)"
fi
[ -n "$RAY" ] || { echo "local_cluster.sh: no 'ray' found (run scripts/setup.sh)" >&2; exit 1; }
BIN="$(dirname "$RAY")"
PYTHON="${PYTHON:-$BIN/python}"
[ -x "$PYTHON" ] || PYTHON=python3

DIR="${VITCNN_RAY_DIR:-/tmp/vitcnn-ray-${USER:-$(id -un)}}"
STATE="$DIR/cluster.env"
PORT="${VITCNN_RAY_PORT:-6379}"
DASHBOARD_PORT="${VITCNN_RAY_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${VITCNN_RAY_CLIENT_PORT:-10001}"
AGENT_PORT="${VITCNN_RAY_AGENT_PORT:-52365}"
HEAD_CPUS="${VITCNN_RAY_HEAD_CPUS:-1}"
WORKER_CPUS="${VITCNN_RAY_WORKER_CPUS:-1}"
OBJECT_STORE_BYTES=$(( ${VITCNN_RAY_OBJECT_STORE_MB:-512} * 1024 * 1024 ))
GRACE="${VITCNN_RAY_STOP_GRACE:-5}"
AUTH_MODE="${RAY_AUTH_MODE:-token}"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# The live processes of this cluster, one "PID:STARTTIME" a line: those whose command
# line names a path under $DIR or whose environment holds the marker, and all their
# descendants; plus those of the given earlier PID:STARTTIME list still running. (A
# renamed process, "ray::IDLE" and the like, may have overwritten part of its
# environment: it is found as a descendant of its raylet, or from the earlier list
# once its raylet is gone. The start time guards against reused PIDs.)
cluster_procs() {
    [ -d /proc ] || die "finding this cluster's processes needs Linux /proc; elsewhere use 'ray stop' (it stops all your Ray processes)"
    "$PYTHON" - "$DIR" "$@" <<'EOF'
import os, sys
folder = sys.argv[1].encode()
markers = {b"VITCNN_RAY_CLUSTER=" + folder, b"RAY_TMPDIR=" + folder}
me, roots, children, started = os.getpid(), set(), {}, {}
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == me:
        continue
    pid = int(name)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            continue  # a zombie is already dead
        started[pid] = fields[19].decode()
        children.setdefault(int(fields[1]), []).append(pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = set(f.read().split(b"\0"))
    except (OSError, IndexError, ValueError):
        continue
    if folder + b"/" in cmdline or markers & environ:
        roots.add(pid)
for token in sys.argv[2:]:
    pid, _, start = token.partition(":")
    if started.get(int(pid)) == start:
        roots.add(int(pid))
found, todo = set(), list(roots)
while todo:
    pid = todo.pop()
    if pid not in found and pid in started:
        found.add(pid)
        todo.extend(children.get(pid, []))
print("\n".join(f"{p}:{started[p]}" for p in sorted(found)))
EOF
}

# Fail early, with the setting to change, when a fixed port is taken.
check_ports() {
    "$PYTHON" - "$@" <<'EOF' || exit 1
import socket, sys
busy = []
for spec in sys.argv[1:]:
    name, port = spec.rsplit("=", 1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        try:
            s.bind(("", int(port)))
        except OSError:
            busy.append(f"{port} ({name})")
if busy:
    sys.exit("local_cluster.sh: port(s) in use: " + ", ".join(busy) + "; set the variable(s) "
             "to free ports, or run 'cluster/local_cluster.sh down' if it is this cluster")
EOF
}

# Ask the job server: "nodes" prints how many nodes are alive, "jobs" lists submitted jobs.
probe() {
    env RAY_AUTH_MODE="$AUTH_MODE" RAY_TMPDIR="$DIR" "$PYTHON" - \
        "http://127.0.0.1:$DASHBOARD_PORT" "$1" <<'EOF'
import sys
url, what = sys.argv[1:]
if what == "nodes":
    from ray.util.state import list_nodes
    print(len(list_nodes(address=url, filters=[("state", "=", "ALIVE")], timeout=10)))
else:
    from ray.job_submission import JobSubmissionClient
    jobs = [j for j in JobSubmissionClient(url).list_jobs() if j.submission_id]
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        print(f"  {j.submission_id}  {j.status.value:<9}  {j.entrypoint[:100]}")
    print(f"{len(jobs)} submitted job(s)")
EOF
}

print_env() {
    cat <<EOF
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=$AUTH_MODE
EOF
}

start_node() {  # the environment every process of the cluster inherits
    env VITCNN_RAY_CLUSTER="$DIR" RAY_TMPDIR="$DIR" RAY_AUTH_MODE="$AUTH_MODE" \
        RAY_USAGE_STATS_ENABLED=0 PATH="$BIN:$PATH" \
        "$RAY" start --disable-usage-stats --temp-dir "$DIR/ray" \
        --object-store-memory "$OBJECT_STORE_BYTES" "$@"
}

cmd_up() {
    local n="${1:-2}"
    [[ "$n" =~ ^[0-9]+$ ]] || die "up takes a number of worker nodes, got '$n'"
    if [ -f "$STATE" ] && [ -n "$(cluster_procs)" ]; then
        die "a cluster is already running in $DIR; 'cluster/local_cluster.sh down' first"
    fi
    [ "${#DIR}" -le 40 ] || die "VITCNN_RAY_DIR is too long (${#DIR} > 40 characters) for Ray's socket paths"
    local ports=("VITCNN_RAY_PORT=$PORT" "VITCNN_RAY_DASHBOARD_PORT=$DASHBOARD_PORT"
        "VITCNN_RAY_CLIENT_PORT=$CLIENT_PORT") i
    for ((i = 0; i <= n; i++)); do ports+=("VITCNN_RAY_AGENT_PORT+$i=$((AGENT_PORT + i))"); done
    check_ports "${ports[@]}"
    rm -rf "$DIR/ray"
    mkdir -p "$DIR"
    if [ "$AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ] \
        && [ ! -s "$HOME/.ray/auth_token" ]; then
        "$RAY" get-auth-token --generate >/dev/null
    fi
    cat >"$STATE" <<EOF
# written by 'cluster/local_cluster.sh up'; status, env and down read it
PORT=$PORT
DASHBOARD_PORT=$DASHBOARD_PORT
AUTH_MODE=$AUTH_MODE
NODES=$((n + 1))
EOF
    local log="$DIR/start.log" gpus=()
    [ -n "${VITCNN_RAY_HEAD_GPUS:-}" ] && gpus=(--num-gpus "$VITCNN_RAY_HEAD_GPUS")
    echo "starting the head (GCS 127.0.0.1:$PORT, job server http://127.0.0.1:$DASHBOARD_PORT)"
    start_node --head --port "$PORT" --include-dashboard true --dashboard-host 127.0.0.1 \
        --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "$CLIENT_PORT" \
        --dashboard-agent-listen-port "$AGENT_PORT" --num-cpus "$HEAD_CPUS" ${gpus[@]+"${gpus[@]}"} \
        >"$log" 2>&1 || { tail -n 20 "$log" >&2; cmd_down >/dev/null; die "the head did not start"; }
    for ((i = 1; i <= n; i++)); do
        echo "starting worker node $i/$n ($WORKER_CPUS CPU)"
        start_node --address "127.0.0.1:$PORT" --num-cpus "$WORKER_CPUS" --num-gpus 0 \
            --dashboard-agent-listen-port "$((AGENT_PORT + i))" >>"$log" 2>&1 \
            || { tail -n 20 "$log" >&2; cmd_down >/dev/null; die "worker node $i did not start"; }
    done
    local alive=0 deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
        alive="$(probe nodes 2>/dev/null | tail -n 1)"
        [[ "$alive" =~ ^[0-9]+$ ]] || alive=0
        [ "$alive" -ge "$((n + 1))" ] && break
        sleep 1
    done
    [ "$alive" -ge "$((n + 1))" ] || echo "warning: only $alive of $((n + 1)) nodes are alive yet" >&2
    cat <<EOF

Ray cluster up: $alive node(s), logs in $DIR/ray/session_latest/logs
Clients on this machine (token auth: the token is \$RAY_AUTH_TOKEN if set, else
~/.ray/auth_token, which 'ray get-auth-token' prints):

$(print_env)

Submit (absolute paths: a job runs in its own working directory):
  vitcnn submit extract vit_small_patch16_224 --img-size 128 --images builtin:photos \\
      --store "\$PWD/acts.zarr" --run vits16 --layers preset:paper --attention --inputs \\
      --workers $n --resume --address http://127.0.0.1:$DASHBOARD_PORT --wait
  ray job list | ray job status ID | ray job logs -f ID | ray job stop ID
Drive it directly instead: vitcnn extract ... --address 127.0.0.1:$PORT
Stop it: cluster/local_cluster.sh down
EOF
}

cmd_status() {
    [ -f "$STATE" ] || die "no cluster in $DIR ('cluster/local_cluster.sh up' starts one)"
    local procs
    procs="$(cluster_procs)"
    [ -n "$procs" ] || die "the cluster in $DIR is not running ('cluster/local_cluster.sh down' cleans up)"
    echo "cluster in $DIR: $(wc -l <<<"$procs") processes, $(probe nodes 2>/dev/null || echo "?") node(s) alive"
    echo "job server http://127.0.0.1:$DASHBOARD_PORT, GCS 127.0.0.1:$PORT"
    env RAY_AUTH_MODE="$AUTH_MODE" RAY_TMPDIR="$DIR" "$RAY" status --address "127.0.0.1:$PORT" \
        2>/dev/null | sed -n '/^Total Usage/,/^$/p' || true
    probe jobs 2>/dev/null || echo "(the job list is not available)"
}

cmd_down() {
    local procs t
    procs="$(cluster_procs)"
    if [ -n "$procs" ]; then
        echo "stopping $(wc -l <<<"$procs") process(es) of the cluster in $DIR"
        # shellcheck disable=SC2046
        kill -TERM $(sed 's/:.*//' <<<"$procs") 2>/dev/null || true
        for ((t = 0; t < GRACE * 2; t++)); do
            # shellcheck disable=SC2086
            procs="$(cluster_procs $procs)"
            [ -z "$procs" ] && break
            sleep 0.5
        done
        if [ -n "$procs" ]; then
            # shellcheck disable=SC2046
            kill -KILL $(sed 's/:.*//' <<<"$procs") 2>/dev/null || true
            sleep 0.5
            # shellcheck disable=SC2086
            procs="$(cluster_procs $procs)"
        fi
    else
        echo "no running cluster in $DIR"
    fi
    [ -z "$procs" ] || die "still running: $(sed 's/:.*//' <<<"$procs" | tr '\n' ' ')"
    rm -rf "$DIR/ray" "$STATE" "$DIR/start.log"
    rmdir "$DIR" 2>/dev/null || true
}

# status, env and down talk to the cluster that `up` made, whatever the environment now.
if [ "${1:-}" != up ] && [ -f "$STATE" ]; then
    # shellcheck disable=SC1090
    . "$STATE"
fi

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    status) cmd_status ;;
    env) print_env ;;
    down) cmd_down ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
