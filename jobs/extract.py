"""The extraction job: plan units, create the run, drive a pool of Ray actors.

The driver builds the model once for the template (a dry-run forward pass on
one image gives every array's shape), creates every array of the run, skips
units already flagged done, and hands the rest to ``--workers`` actors, each
holding at most two units at a time so its write overlaps its next forward.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.worker import ExtractionPlan, make_actor_class
from vitcnn_store._version import FORMAT_VERSION, __version__
from vitcnn_store.capture import Capture, LayerLayout
from vitcnn_store.data import ImageSet, open_image_set
from vitcnn_store.errors import ImageSetError, LayerPatternError, UsageError, VitcnnError
from vitcnn_store.models import (
    ModelSpec,
    attention_modules,
    build_model,
    data_config,
    expand_layers,
    layer_roles,
    match_patterns,
    model_family,
    weights_sha256,
)
from vitcnn_store.store import ArraySpec, RunWriter, consolidate, create_run, prepare_run
from vitcnn_store.store.layout import check_name, open_root
from vitcnn_store.store.lease import (
    DEFAULT_TTL,
    Lease,
    acquire_lease,
    check_not_leased,
    new_owner,
    release_lease,
    renew_lease,
)
from vitcnn_store.store.writer import COMPRESSIONS, check_peaks

__all__ = ["ExtractConfig", "ExtractSummary", "extract"]

IN_FLIGHT_PER_ACTOR = 2  # one unit writing while the next one runs forward


@dataclass(frozen=True)
class ExtractConfig:
    """Options of ``vitcnn extract`` (see its ``--help``)."""

    model: ModelSpec
    images: str
    store: str
    run: str
    layers: str = "preset:blocks"
    attention: bool = False
    attention_layers: str | None = None
    inputs: bool = False
    dtype: str = "float16"
    compression: str = "lz4"
    chunk_size: int = 32
    batch_size: int | None = None
    limit: int | None = None
    strict: bool = False
    resume: bool = False
    overwrite: bool = False
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    device: str = "auto"
    autocast: bool = False
    address: str | None = None
    progress: bool = True
    lease_ttl: float = DEFAULT_TTL
    extra_attrs: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        check_name(self.run)
        for name, value in (
            ("--workers", self.workers),
            ("--chunk-size", self.chunk_size),
            ("--batch-size", self.batch_size if self.batch_size is not None else 1),
            ("--cpus-per-worker", self.cpus_per_worker),
            ("--lease-ttl", self.lease_ttl),
        ):
            if value <= 0:
                raise UsageError(f"{name} must be positive, got {value}")
        if self.gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.dtype not in ("float16", "float32"):
            raise UsageError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise UsageError(
                f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        if self.resume and self.overwrite:
            raise UsageError("give either --resume or --overwrite, not both")
        if self.attention_layers and not self.attention:
            raise UsageError("--attention-layers needs --attention")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class ExtractSummary:
    """What a job did, printed at its end."""

    run: str
    store: str
    n_images: int
    units_total: int
    units_written: int
    images_written: int
    failed: dict[str, str]
    seconds: float
    nodes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = self.images_written / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"run {self.run!r} in {self.store}: {self.n_images} images, "
            f"{self.units_written} of {self.units_total} units written now "
            f"({self.images_written} images in {self.seconds:.1f} s, {rate:.1f} img/s)",
        ]
        if self.failed:
            lines.append(f"{len(self.failed)} image(s) failed to decode:")
            lines += [f"  {k}: {v}" for k, v in list(self.failed.items())[:10]]
        return "\n".join(lines)


def _select_attention(model: Any, cfg: ExtractConfig) -> list[str]:
    if not cfg.attention:
        return []
    available = attention_modules(model)
    if not available:
        raise LayerPatternError(f"--attention: {type(model).__name__} has no attention modules")
    if not cfg.attention_layers:
        return available
    return match_patterns(available, cfg.attention_layers, "attention module (--attention-layers)")


def _array_specs(
    layouts: dict[str, LayerLayout], dcfg: dict[str, Any], inputs: bool,
    roles: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[ArraySpec]:  # fmt: skip
    # Group order = forward order; depth_fraction is the paper's normalised layer number.
    groups: dict[str, int] = {}
    for key, _ in sorted(layouts.items(), key=lambda kv: kv[1].depth_index):
        groups.setdefault(key.split("/")[0], len(groups))
    denom = max(len(groups) - 1, 1)
    specs = []
    for key, lay in layouts.items():
        group = key.split("/")[0]
        attrs = {
            "depth_index": groups[group],
            "depth_fraction": groups[group] / denom,
            "module_type": lay.module_type,
            **(roles or {}).get(group, {}),  # role, block, branches / skip_input (families.py)
        }
        if lay.kind != "attention":
            attrs["kind"] = lay.kind
        dims = lay.dims
        coords = {
            name: ((name,) if name in dims else ("token",), v) for name, v in lay.coords.items()
        }
        specs.append(
            ArraySpec(group, "attention" if lay.kind == "attention" else "activation", dims,
                      lay.shape, coords, attrs)
        )  # fmt: skip
    # A group holding only attention still needs a kind.
    for s in specs:
        if s.name == "attention" and not any(
            o.group == s.group and o.name == "activation" for o in specs
        ):
            s.attrs["kind"] = "attention"  # type: ignore[index]
    if inputs:
        _, h, w = dcfg["input_size"]
        import numpy as np

        specs.append(
            ArraySpec("", "input", ("input_y", "input_x", "rgb"), (h, w, 3), {
                "input_y": (("input_y",), (np.arange(h) + 0.5).astype(np.float32)),
                "input_x": (("input_x",), (np.arange(w) + 0.5).astype(np.float32)),
            })
        )  # fmt: skip
    return specs


def _provenance(
    cfg: ExtractConfig, sha: str, dcfg: dict[str, Any], images: ImageSet, family: str | None,
    layers: list[str], attention: list[str],
) -> dict[str, Any]:  # fmt: skip
    import timm
    import torch

    spec = cfg.model
    return {
        "model": spec.name,
        "model_family": family,
        "model_args": dict(spec.model_args),
        "img_size": spec.img_size,
        "weights_source": spec.weights_source,
        "weights_seed": spec.seed if spec.weights_source == "random-init" else None,
        "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
        "weights_sha256": sha,
        **dcfg,
        "input_normalized": True,
        "image_set": images.spec,
        "image_set_sha256": images.content_hash(),
        "n_images": len(images),
        "label_names": list(images.label_names),
        "layers": layers,
        "attention_layers": attention,
        "inputs": cfg.inputs,
        "dtype": cfg.dtype,
        "compression": cfg.compression,
        "chunk_size": cfg.chunk_size,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "code_version": __version__,
        "format": FORMAT_VERSION,
        **dict(cfg.extra_attrs),
    }


def _resolve_device(cfg: ExtractConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if cfg.gpus_per_worker > 0 else "cpu"


def _first_image(images: ImageSet, dcfg: dict[str, Any]) -> Any:
    """The first decodable image, preprocessed, as a batch of one (zeros if none decode)."""
    import torch

    from vitcnn_store.errors import ImageDecodeError
    from vitcnn_store.models import make_transform

    transform = make_transform(dcfg)
    for i in range(min(len(images), 8)):
        try:
            return transform(images.load(i)).unsqueeze(0)
        except ImageDecodeError:
            continue
    return torch.zeros(1, *dcfg["input_size"])


def plan_extraction(cfg: ExtractConfig) -> tuple[ExtractionPlan, dict[str, Any], list[ArraySpec]]:
    """Build the model once and derive the run's template and the workers' plan."""
    import torch

    cfg.validate()
    images = open_image_set(cfg.images, limit=cfg.limit)
    model = build_model(cfg.model)
    layers = expand_layers(model, cfg.layers)
    attention = _select_attention(model, cfg)
    dcfg = data_config(model, cfg.model.img_size)
    with Capture(model, layers, attention) as cap:
        # The template comes from a real image, so weights that overflow float16 or
        # give NaN are refused here, before anything is written.
        x = _first_image(images, dcfg)
        acts, attn = cap(x)
        check_peaks(((k, float(v.abs().max())) for k, v in {**acts, **attn}.items()), cfg.dtype)
        layouts = cap.describe(x)
    layers = sorted(layers, key=lambda n: layouts[n].depth_index)
    sha = weights_sha256(model)
    is_cnn = not attention_modules(model) and any(
        isinstance(m, torch.nn.Conv2d) for m in model.modules()
    )
    provenance = _provenance(cfg, sha, dcfg, images, model_family(model), layers, attention)
    plan = ExtractionPlan(
        model=cfg.model,
        weights_sha256=sha,
        data_config=dcfg,
        images=images,
        url=cfg.store,
        run=cfg.run,
        layers=tuple(layers),
        attention_layers=tuple(attention),
        inputs=cfg.inputs,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size or cfg.chunk_size,
        device=_resolve_device(cfg),
        autocast=cfg.autocast,
        threads=max(1, int(cfg.cpus_per_worker)),
        channels_last=is_cnn,
    )
    return plan, provenance, _array_specs(layouts, dcfg, cfg.inputs, layer_roles(model))


def prepare_store(cfg: ExtractConfig, plan: ExtractionPlan, provenance: dict[str, Any],
                  specs: list[ArraySpec]) -> RunWriter:  # fmt: skip
    """Create (or check for resume) the run; nothing is written before all checks pass."""
    _refuse_if_leased(cfg)
    if cfg.strict:
        bad = plan.images.check_all(progress=cfg.progress)
        if bad:
            first = "; ".join(f"{plan.images.records[i].image_id}: {why}" for i, why in bad[:3])
            raise ImageSetError(
                f"--strict: {len(bad)} image(s) cannot be decoded ({first}); nothing was written"
            )
    if prepare_run(cfg.store, cfg.run, provenance, resume=cfg.resume, overwrite=cfg.overwrite):
        create_run(
            cfg.store, cfg.run,
            image_ids=[r.image_id for r in plan.images.records],
            labels=[r.label for r in plan.images.records],
            chunk=cfg.chunk_size, dtype=cfg.dtype, arrays=specs, attrs=provenance,
            compression=cfg.compression,
        )  # fmt: skip
    return RunWriter(cfg.store, cfg.run)


def _refuse_if_leased(cfg: ExtractConfig) -> None:
    try:
        root = open_root(cfg.store, mode="r")
    except VitcnnError:
        return  # no store yet: nothing can hold the run; open errors surface later
    if cfg.run in root:
        check_not_leased(cfg.store, cfg.run)


class _LeaseKeeper:
    """Holds a run's lease for one job, renewing it from a background thread."""

    def __init__(self, cfg: ExtractConfig) -> None:
        self.url, self.run, self.ttl = cfg.store, cfg.run, cfg.lease_ttl
        self.lease: Lease = acquire_lease(self.url, self.run, new_owner(), self.ttl)
        self._stop = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._renew, daemon=True, name="vitcnn-lease")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.lease = renew_lease(self.url, self.run, self.lease, self.ttl)
            except Exception as e:  # surfaced by check() on the driver's thread
                self._error = e
                return

    def check(self) -> None:
        """Raise if the lease was lost (another job took the run over)."""
        if self._error is not None:
            raise self._error

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        release_lease(self.url, self.run, self.lease.owner)


def _passthrough_env() -> dict[str, str]:
    """Credentials and endpoints for object stores, forwarded to the actors."""
    prefixes = ("AWS_", "FSSPEC_", "GOOGLE_", "GCSFS_", "AZURE_", "S3_")
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes)}


def _connect(cfg: ExtractConfig) -> bool:
    """Connect to Ray (``--address``, ``RAY_ADDRESS`` or a new local one); True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if not address:
        # A cluster of our own stays on loopback: nothing is exposed to the network.
        kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1")
    ray.init(address=address, **kwargs)
    return True


def _check_resources(cfg: ExtractConfig) -> None:
    import ray

    total = ray.cluster_resources()
    need_cpu = cfg.workers * cfg.cpus_per_worker
    need_gpu = cfg.workers * cfg.gpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise UsageError(
            f"{cfg.workers} worker(s) × {cfg.cpus_per_worker:g} CPU need {need_cpu:g} CPUs; "
            f"the Ray cluster has {total.get('CPU', 0):g}: lower --workers or --cpus-per-worker"
        )
    if need_gpu > total.get("GPU", 0):
        raise UsageError(
            f"{cfg.workers} worker(s) × {cfg.gpus_per_worker:g} GPU need {need_gpu:g} GPUs; "
            f"the Ray cluster has {total.get('GPU', 0):g}"
        )


def _unwrap(error: Exception) -> Exception:
    """The user-facing cause inside a Ray task error, when there is one."""
    cause = getattr(error, "cause", None)
    while cause is not None and not isinstance(cause, VitcnnError):
        cause = getattr(cause, "cause", None) or cause.__cause__
    return cause if isinstance(cause, VitcnnError) else error


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Run an extraction job to completion and return its summary.

    Examples
    --------
    >>> spec = ModelSpec("resnet18")
    >>> cfg = ExtractConfig(spec, "builtin:faces", "acts.zarr", "r18")  # doctest: +SKIP
    >>> print(extract(cfg))  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    plan, provenance, specs = plan_extraction(cfg)
    writer = prepare_store(cfg, plan, provenance, specs)
    keeper = _LeaseKeeper(cfg)
    try:
        pending = writer.pending_units()
        summary = ExtractSummary(
            cfg.run, cfg.store, writer.n_images, len(writer.units), 0, 0, {}, 0.0
        )
        if pending:
            started = _connect(cfg)
            try:
                _check_resources(cfg)
                _drive(cfg, plan, writer, pending, summary, keeper)
            finally:
                if started:
                    import ray

                    ray.shutdown()
    finally:
        keeper.release()
    consolidate(cfg.store)
    from vitcnn_store.store import open_store

    summary.failed = open_store(cfg.store)[cfg.run].failed
    summary.seconds = time.perf_counter() - t0
    return summary


def _drive(cfg: ExtractConfig, plan: ExtractionPlan, writer: RunWriter, pending: list[int],
           summary: ExtractSummary, keeper: _LeaseKeeper) -> None:  # fmt: skip
    import ray
    from tqdm.auto import tqdm

    actor_cls = make_actor_class().options(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker,
        max_concurrency=IN_FLIGHT_PER_ACTOR,
        max_restarts=2,
        max_task_retries=2,  # a retried unit rewrites the same chunks: idempotent
        runtime_env={"env_vars": _passthrough_env()},
    )
    # The plan goes by value: an actor restarted after a crash must not depend on an
    # object-store copy that may be gone.
    actors = [actor_cls.remote(plan) for _ in range(min(cfg.workers, len(pending)))]
    queue = list(pending)
    in_flight: dict[Any, Any] = {}
    total = sum(writer.units[u][1] - writer.units[u][0] for u in pending)
    bar = tqdm(total=total, unit="img", desc=f"extract {cfg.run}", disable=not cfg.progress,
               file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    try:
        summary.nodes = sorted({n for n, _ in ray.get([a.where.remote() for a in actors])})
        for actor in actors:
            for _ in range(IN_FLIGHT_PER_ACTOR):
                if queue:
                    in_flight[actor.run_unit.remote(queue.pop(0))] = actor
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(ready[0])
            try:
                _unit, n, _secs = ray.get(ready[0])
            except Exception as e:
                raise _unwrap(e) from None
            summary.units_written += 1
            summary.images_written += n
            bar.update(n)
            keeper.check()
            if queue:
                in_flight[actor.run_unit.remote(queue.pop(0))] = actor
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
