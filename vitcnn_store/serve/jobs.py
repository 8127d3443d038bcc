"""Analysis jobs submitted over HTTP (``--allow-jobs``), run by the CLI's own job functions.

``POST /api/jobs`` with ``{"kind": "analysis", "analysis": "cka", "run": "vit",
"options": {"estimator": "biased"}}`` queues a job; one worker thread runs
jobs in order through :func:`vitcnn_store.interface.cli_analyze.analyze` — what
``vitcnn analyze`` runs — on the server's threads or ``--dask-address``, so the
result lands in the store as if made from the CLI. ``GET /api/jobs/{id}``
reports status (``queued``, ``running``, ``succeeded``, ``failed``), progress
(dask tasks finished of those scheduled so far) and the result's group.

Options are the fields of the analysis's config (``vitcnn analyze ... --help``,
flags without dashes, ``-`` as ``_``: ``batch_size``, ``max_batches``), as JSON
values or as the text the CLI takes (``"tokens": "3:3,7:7"``); where the job
runs (``dask_address``, ``threads``) is the server's choice.

Every record is a JSON file in the jobs folder (``<store>.jobs`` beside the
store, never inside it). A server started with ``--allow-jobs`` marks the
records it finds ``queued`` or ``running`` as failed: the server that ran them
stopped before they finished. One server runs the jobs of one jobs folder.
Extraction jobs (``kind: "extract"``, with ``--ray-address``) run on a Ray
cluster instead (:mod:`vitcnn_store.serve.extract_jobs`); a restarted server
re-attaches to them by their Ray submission id.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import queue
import re
import secrets
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from vitcnn_store.serve.config import ServeConfig
from vitcnn_store.serve.errors import ApiError, one_line

__all__ = ["JobManager", "JobRecord", "JobRequest", "analysis_config", "router"]

router = APIRouter(prefix="/api", tags=["jobs"])
# Where and how a job runs is the server's to decide, not the client's.
SERVER_OPTIONS = frozenset({"store", "dask_address", "threads", "progress"})
_ID = re.compile(r"[0-9a-f]{16}")
_SAVE_EVERY = 1.0  # seconds between progress writes of a running job


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class JobRequest(BaseModel):
    """What ``POST /api/jobs`` takes."""

    kind: Literal["analysis", "extract"] = "analysis"
    analysis: str | None = Field(None, description="cka, attention, localization, skip or probe")
    run: str | None = Field(None, description="run the result is written under")
    run2: str | None = Field(None, description="second run (cka, cross-model)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="the analysis's options by field name"
    )
    args: list[str] = Field(
        default_factory=list,
        description="extract: the `vitcnn extract` arguments (model, --images, ...) "
        "without --store, --run and --address, which are the server's",
    )


@dataclass
class JobRecord:
    """A job as stored in its JSON file and answered by ``GET /api/jobs/{id}``."""

    id: str
    kind: str
    request: dict[str, Any]
    status: str = "queued"
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    finished_at: str | None = None
    progress: dict[str, int] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    ray_job_id: str | None = None  # extraction: the Ray job's submission id
    logs_tail: str | None = None  # extraction: the last lines of the Ray job's log
    note: str | None = None  # extraction: why the status could not be refreshed just now


def _option_value(analysis: str, opt: Any, key: str, value: Any) -> Any:
    import argparse

    if opt.action in ("true", "false"):
        if not isinstance(value, bool):
            raise ApiError(400, f"option {key!r} of {analysis} wants true or false")
        return value
    if isinstance(value, str) and opt.parse is not None and opt.parse is not str:
        try:
            return opt.parse(value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ApiError(400, f"option {key!r} of {analysis}: {e}") from None
    if isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def analysis_config(config: ServeConfig, body: JobRequest) -> Any:
    """The validated config of the analysis ``body`` asks for, on the server's store."""
    from dataclasses import fields

    from vitcnn_store.interface.registry import ANALYSES
    from vitcnn_store.options import options_of
    from vitcnn_store.store.layout import check_name

    analysis = body.analysis or ""
    if analysis not in ANALYSES:
        raise ApiError(400, f"analysis {analysis!r}: want one of {', '.join(ANALYSES)}")
    if not body.run:
        raise ApiError(400, "run: the run to analyse is required")
    cls = ANALYSES[analysis].config
    table = {f.name: opt for f, opt in options_of(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in body.options.items():
        if key in SERVER_OPTIONS:
            raise ApiError(400, f"option {key!r} is the server's to choose")
        if key not in table:
            known = ", ".join(k for k in table if k not in SERVER_OPTIONS)
            raise ApiError(400, f"unknown option {key!r} of {analysis} (options: {known})")
        kwargs[key] = _option_value(analysis, table[key], key, value)
    if kwargs.get("name") is not None:
        check_name(str(kwargs["name"]), "analysis")  # refused now: the job checks it only later
    if any(f.name == "run2" for f in fields(cls)):
        kwargs["run2"] = body.run2
    elif body.run2 is not None:
        raise ApiError(400, f"{analysis} takes one run; run2 is for cka")
    try:
        return cls(
            store=config.store,
            run=body.run,
            dask_address=config.dask_address,
            progress=False,
            **kwargs,
        )
    except TypeError as e:
        raise ApiError(400, one_line(e)) from None


class _Progress:
    """Counts dask tasks of the local scheduler run by one thread (the job worker's)."""

    def __init__(self, thread: int, record: JobRecord, save: Any) -> None:
        from dask.callbacks import Callback

        self.thread = thread
        self.record = record
        self.save = save
        self.before = 0  # tasks of finished graphs
        self.saved_at = 0.0
        self.callback = Callback(
            start_state=self._start, posttask=self._posttask, finish=self._finish
        )
        self.state: dict[str, Any] | None = None

    def _start(self, dsk: Any, state: dict[str, Any]) -> None:
        if threading.get_ident() == self.thread:
            self.state = state

    def _counts(self) -> tuple[int, int]:
        s = self.state or {}
        done = len(s.get("finished", ()))
        total = done + sum(len(s.get(k, ())) for k in ("ready", "waiting", "running"))
        return self.before + done, self.before + total

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if threading.get_ident() != self.thread or self.state is None:
            return
        done, total = self._counts()
        self.record.progress = {"tasks_done": done, "tasks_scheduled": total}
        if time.monotonic() - self.saved_at > _SAVE_EVERY:
            self.saved_at = time.monotonic()
            self.save(self.record)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        if threading.get_ident() == self.thread and self.state is not None:
            self.before = self._counts()[1]
            self.state = None


class JobManager:
    """The job records of a store and the one worker thread that runs them."""

    def __init__(self, config: ServeConfig) -> None:
        import fsspec

        self.config = config
        self.fs, self.dir = fsspec.core.url_to_fs(config.jobs_location)
        self.local = "file" in self.fs.protocol or "local" in self.fs.protocol
        self.queue: queue.Queue[tuple[JobRecord, Any] | None] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        from vitcnn_store.serve.extract_jobs import ExtractJobs

        self.extract = ExtractJobs(config.ray_address)

    # -- records --------------------------------------------------------------------

    def _path(self, job_id: str) -> str:
        return f"{self.dir.rstrip('/')}/{job_id}.json"

    def save(self, record: JobRecord) -> None:
        data = json.dumps(asdict(record), indent=1).encode()
        path = self._path(record.id)
        with self.lock:
            if self.local:  # write then rename: a reader never sees half a record
                os.makedirs(self.dir, exist_ok=True)
                tmp = f"{path}.{secrets.token_hex(4)}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)

    def get(self, job_id: str) -> JobRecord:
        if not _ID.fullmatch(job_id):
            raise ApiError(404, f"no job {job_id[:40]!r}")
        try:
            raw = self.fs.cat_file(self._path(job_id))
        except FileNotFoundError:
            raise ApiError(404, f"no job {job_id!r}") from None
        record = JobRecord(**json.loads(raw))
        if record.kind == "extract" and self.extract.refresh(record):
            self.save(record)  # Ray's answer, kept for when the cluster is gone
        return record

    def records(self) -> list[JobRecord]:
        try:
            paths = sorted(self.fs.glob(f"{self.dir.rstrip('/')}/*.json"))
        except FileNotFoundError:
            return []
        out = []
        for path in paths:
            name = path.rsplit("/", 1)[-1].removesuffix(".json")
            if _ID.fullmatch(name):
                try:
                    out.append(self.get(name))
                except (ApiError, ValueError, TypeError):
                    continue  # a damaged record hides no other
        return sorted(out, key=lambda r: r.created_at)

    # -- the worker -----------------------------------------------------------------

    def start(self) -> None:
        """Fail the records a stopped server left unfinished; start the worker (jobs on)."""
        if not self.config.allow_jobs:
            return  # nothing writes without --allow-jobs
        for record in self.records():  # extractions: re-attached to their Ray jobs
            if record.kind != "extract" and record.status in ("queued", "running"):
                record.status = "failed"
                record.finished_at = _now()
                record.error = "the server stopped before the job finished; submit it again"
                self.save(record)
        self.thread = threading.Thread(target=self._work, name="vitcnn-jobs", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout=5)
            self.thread = None

    def submit(self, body: JobRequest) -> JobRecord:
        if not self.config.allow_jobs:
            raise ApiError(403, "jobs are off: start the server with --allow-jobs --token-file F")
        if body.kind == "extract":
            return self._submit_extract(body)
        config = analysis_config(self.config, body)  # bad options: 400 now, not later
        from vitcnn_store.store import open_store

        store = open_store(self.config.store)
        for name in (body.run, body.run2):
            if name is not None:
                store[name]  # 404 for a missing run, 409 for a broken one
        record = JobRecord(id=secrets.token_hex(8), kind=body.kind, request=body.model_dump())
        self.save(record)
        self.queue.put((record, config))
        return record

    def _submit_extract(self, body: JobRequest) -> JobRecord:
        from vitcnn_store.serve.extract_jobs import extract_config

        cfg = extract_config(self.config.store, body.run, body.args)  # bad args: 400 now
        self.extract.client()  # no cluster: 501 or 503 before any record
        job_id = secrets.token_hex(8)
        record = JobRecord(
            id=job_id, kind="extract", request=body.model_dump(), ray_job_id=f"vitcnn-{job_id}"
        )
        self.save(record)  # first: a server that dies now re-attaches by the id
        try:
            self.extract.submit(cfg, str(record.ray_job_id))
        except ApiError as e:
            record.status, record.error, record.finished_at = "failed", e.message, _now()
            self.save(record)
            raise
        record.status, record.started_at = "running", _now()
        self.save(record)
        return record

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            self._run(*item)

    def _run(self, record: JobRecord, config: Any) -> None:
        from vitcnn_store.interface.cli_analyze import analyze
        from vitcnn_store.interface.registry import AnalysisWarning

        record.status, record.started_at = "running", _now()
        self.save(record)
        progress = _Progress(threading.get_ident(), record, self.save)
        progress.callback.register()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", AnalysisWarning)
                analysis = str(record.request["analysis"])
                result, _ = analyze(analysis, config, figure=False)
            record.warnings = [
                one_line(w.message) for w in caught if issubclass(w.category, AnalysisWarning)
            ]
            record.result = {
                "analysis": result.analysis,
                "run": result.run,
                "name": result.name,
                "group": result.group,
                "reused": result.reused,
                "summary": result.attrs.get("summary"),
                "url": f"/api/runs/{result.run}/analyses/{result.name}",
            }
            record.status = "succeeded"
        except Exception as e:  # the job failed, the server goes on
            record.status = "failed"
            record.error = f"{type(e).__name__}: {one_line(e)}"
        finally:
            progress.callback.unregister()
            record.finished_at = _now()
            self.save(record)


def _manager(request: Request) -> JobManager:
    return request.app.state.jobs


@router.post(
    "/jobs",
    status_code=202,
    summary="Submit an analysis or extraction job (--allow-jobs)",
    responses={
        403: {"description": "jobs are off"},
        501: {"description": "extraction jobs: the server has no --ray-address"},
        503: {"description": "extraction jobs: the Ray job server is unreachable or refused"},
    },
)
def submit_job(body: JobRequest, request: Request) -> dict[str, Any]:
    """Queue an analysis, or submit an extraction to Ray; poll ``GET /api/jobs/{id}``
    for its status, progress (extraction: the Ray job's log tail) and result."""
    return asdict(_manager(request).submit(body))


@router.get("/jobs", summary="Every job record")
def list_jobs(request: Request) -> dict[str, Any]:
    return {"jobs": [asdict(r) for r in _manager(request).records()]}


@router.get("/jobs/{job_id}", summary="One job: status, progress, result")
def get_job(job_id: str, request: Request) -> dict[str, Any]:
    return asdict(_manager(request).get(job_id))
