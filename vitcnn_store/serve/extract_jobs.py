"""Extraction jobs over HTTP: ``vitcnn extract`` submitted to a Ray cluster as a Ray job.

``POST /api/jobs`` with ``{"kind": "extract", "run": "vit", "args": ["vit_tiny_patch16_224",
"--images", "builtin:faces", "--limit", "16"]}`` checks the arguments as
``vitcnn extract`` would (``--store``, ``--run`` and ``--address`` are the
server's: the store it serves, the body's ``run``, its ``--ray-address``) and
submits them through Ray's job submission exactly as ``vitcnn submit extract``
does (:func:`jobs.submit.submit_extract`, through
:mod:`vitcnn_store.interface.submission`), so the run lands in the store as if
extracted from the CLI. ``GET /api/jobs/{id}`` asks Ray for the job's status
and the tail of its logs.

The Ray submission id is ``vitcnn-<job id>``, written in the record before the
job is submitted: a server restarted mid-job re-attaches to the Ray job by that
id (the cluster kept running it); a record whose Ray job the cluster does not
know is reported failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import threading
from typing import Any

from vitcnn_store.serve.errors import ApiError, one_line

__all__ = ["ExtractJobs", "extract_config"]

#: Ray job states (``JobStatus``) and the record's status for each.
_STATUS = {
    "PENDING": "queued",
    "RUNNING": "running",
    "SUCCEEDED": "succeeded",
    "FAILED": "failed",
    "STOPPED": "failed",
}
_LOG_LINES = 40  # lines of the job's log kept in its record
_SERVER_FLAGS = ("--store", "--run", "--address")


class _ArgsParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # a 400 with argparse's one line, never an exit
        raise ApiError(400, f"args: {message}")


def extract_config(store: str, run: str | None, args: list[str]) -> Any:
    """The checked :class:`~jobs.config.ExtractConfig` of ``vitcnn extract ARGS`` on ``store``."""
    from vitcnn_store.errors import VitcnnError
    from vitcnn_store.interface.submission import extract_config_class
    from vitcnn_store.options import add_arguments, config_kwargs

    ExtractConfig = extract_config_class()

    if not run:
        raise ApiError(400, "run: the run to extract into is required")
    for arg in args:
        if arg.split("=", 1)[0] in _SERVER_FLAGS:
            raise ApiError(400, f"args: {arg.split('=', 1)[0]} is the server's to choose")
    parser = _ArgsParser(prog="extract", add_help=False)
    add_arguments(parser, ExtractConfig, skip=_SERVER_FLAGS)
    parsed = parser.parse_args(args)
    try:
        cfg = ExtractConfig(**{**config_kwargs(ExtractConfig, parsed), "store": store, "run": run})
        cfg.validate()  # as `vitcnn submit` does: bad input is refused here, not on the cluster
    except (VitcnnError, ValueError, TypeError) as e:
        raise ApiError(400, one_line(e)) from None
    return cfg


def _tail(text: str, lines: int = _LOG_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class ExtractJobs:
    """Submits extraction records to the Ray job server at ``address`` and follows them."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        """The job client, made once (it checks the server's version on creation)."""
        if self.address is None:
            raise ApiError(
                501, "extraction jobs need a Ray cluster: start the server with --ray-address"
            )
        with self._lock:
            if self._client is None:
                from vitcnn_store.errors import VitcnnError
                from vitcnn_store.interface.submission import job_client

                try:
                    self._client = job_client(self.address)
                except VitcnnError as e:
                    raise ApiError(503, one_line(e)) from None
            return self._client

    def submit(self, cfg: Any, submission_id: str) -> None:
        """Submit ``cfg`` as the Ray job ``submission_id`` (503 when Ray refuses)."""
        from vitcnn_store.interface.submission import submit_extract

        try:
            submit_extract(self.client(), cfg, job_id=submission_id)
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(503, f"the Ray job server refused the job: {one_line(e)}") from None

    def refresh(self, record: Any) -> bool:
        """Update ``record`` from its Ray job; ``True`` when something changed."""
        if record.status not in ("queued", "running") or not record.ray_job_id:
            return False
        try:
            client = self.client()
            status = str(client.get_job_status(record.ray_job_id).value)
            logs = _tail(client.get_job_logs(record.ray_job_id))
        except ApiError as e:
            record.note = e.message  # Ray unreachable now: keep the status, say why
            return False
        except Exception as e:
            if "does not exist" in str(e) or "404" in str(e):
                record.status = "failed"
                record.error = f"the Ray cluster knows no job {record.ray_job_id}"
                return True
            record.note = f"cannot ask Ray: {one_line(e)}"
            return False
        new = _STATUS.get(status, "running")
        changed = new != record.status or logs != record.logs_tail
        record.status, record.logs_tail, record.note = new, logs, None
        if new in ("succeeded", "failed"):
            record.finished_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        if new == "succeeded":
            run = record.request["run"]
            record.result = {"run": run, "url": f"/api/runs/{run}"}
        elif new == "failed":
            last = logs.splitlines()[-1] if logs else ""
            record.error = f"Ray job {record.ray_job_id} {status.lower()}" + (
                f": {last}" if last else ""
            )
        return changed
