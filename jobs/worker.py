"""The extraction worker: decode → forward → checks → zarr write, per work unit.

:class:`UnitExtractor` holds one model and runs the three stages of a unit;
the in-process runner (:mod:`jobs.inprocess`) and the Ray actor
(:func:`make_actor_class`) drive it. Neither builds the model: both get the
driver's module — in process, the very object; on Ray, through the object
store — so the weights every worker holds are the bytes whose hash the run
records, hashed once, by the driver. A worker opens the run only at its first
write: the driver starts every worker before it creates or replaces the run,
so a pool that cannot start leaves the store untouched.

The forward stage does the least it can on the forward's thread: the capture
hooks take one copy of each output, cast to the store's dtype on the way. The
finiteness check (NaN, inf, float16 overflow), NaN rows for failed images,
compression, checksums and store I/O happen in the write stage, which the
runners put on another thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.sizing import ExecutionPlan, local_resources, size_job
from vitcnn_store.data import ImageSet
from vitcnn_store.errors import ImageDecodeError
from vitcnn_store.models.capture import Capture
from vitcnn_store.options import AUTO
from vitcnn_store.store import RunWriter
from vitcnn_store.store.layout import storage_options, use_storage_options
from vitcnn_store.store.writer import check_peaks

if TYPE_CHECKING:
    import torch

    from vitcnn_store.models.reduce import ResolvedReduction

__all__ = [
    "CHANGED_REASON",
    "Decoded",
    "ExtractionPlan",
    "NotLoadedError",
    "UnitExtractor",
    "UnitValues",
    "check_finite",
    "make_actor_class",
]


@dataclass(frozen=True)
class ExtractionPlan:
    """What every worker extracts, picklable; made once by the driver, after the job was sized.

    Where a worker runs it — device, torch threads, decoding threads — is the job's
    :class:`~jobs.sizing.ExecutionPlan`, handed to :class:`UnitExtractor` next to it.
    """

    weights_sha256: str
    data_config: Mapping[str, Any] | None
    images: ImageSet
    url: str
    run: str
    layers: tuple[str, ...]
    attention_layers: tuple[str, ...]
    inputs: bool
    dtype: str
    batch_size: int
    input_size: tuple[int, int, int]
    autocast: bool = False
    channels_last: bool = False
    transform: Callable[[Any], Any] | None = None
    reductions: Mapping[str, ResolvedReduction] = field(default_factory=dict)
    #: fsspec options of ``url`` (endpoint, credentials, ...): resolved on the driver when
    #: the plan is made (``--storage-option``, the config file, ``VITCNN_STORAGE_OPTIONS``)
    #: and carried to every actor with the plan, since a worker on another node sees
    #: neither the driver's flags nor its environment. Never shown, never stored.
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.storage_options is None:
            object.__setattr__(self, "storage_options", storage_options(self.url))


#: Why an image whose bytes changed between planning and decoding is not stored.
CHANGED_REASON = (
    "changed during extraction (the decoded bytes' sha256 differs from the run's "
    "image_sha256); re-extract with --overwrite"
)


@dataclass
class Decoded:
    """One unit's preprocessed batch, failed images with reasons, and content hashes."""

    batch: torch.Tensor
    failed: np.ndarray
    reasons: list[str]
    digests: list[str]

    def unit_values(self, unit: int, values: dict[str, np.ndarray]) -> UnitValues:
        """The unit's forward output ``values`` with what decoding found."""
        return UnitValues(unit, values, self.failed, self.reasons, self.digests)


@dataclass
class UnitValues:
    """One unit's arrays (keys like ``blocks.3/activation``), its failed images, and
    the content hash of each image as decoded (``""`` for images that failed)."""

    unit: int
    values: dict[str, np.ndarray]
    failed: np.ndarray
    reasons: list[str]
    digests: list[str]

    @property
    def n_images(self) -> int:
        return len(self.failed)


def check_finite(values: Mapping[str, np.ndarray], dtype: str) -> None:
    """Refuse NaN/inf in any array (after the cast, float16 overflow shows as inf).

    Runs on the write thread with one torch thread: one vectorised pass per
    array, and the exact culprit is found only when something is wrong.
    """
    import torch

    bad = [k for k, v in values.items() if not bool(torch.from_numpy(v).isfinite().all())]
    if bad:
        key = bad[0]
        v = torch.from_numpy(values[key]).float()
        peak = float("nan") if bool(v.isnan().any()) else float("inf")
        check_peaks([(key, peak)], dtype)


class UnitExtractor:
    """Extracts whole work units of one run with ``model`` (the driver's module).

    ``sizing`` says where: the device, the forward's torch threads and the decoding
    threads (the job's :func:`~jobs.sizing.size_job`); without it, in this process
    as a job with every option ``auto`` would run here (tests and benchmarks that
    drive one extractor themselves).

    Thread-safe: stages may run on different threads; forwards run one at a time.
    """

    def __init__(
        self, plan: ExtractionPlan, model: torch.nn.Module, sizing: ExecutionPlan | None = None
    ) -> None:
        import torch

        if sizing is None:
            sizing = size_job(AUTO, AUTO, AUTO, AUTO, local_resources(), address=None)
        torch.set_num_threads(sizing.threads)
        self.plan, self.sizing = plan, sizing
        self.device = torch.device(sizing.device)
        self.model = model.eval().to(self.device)
        if plan.channels_last:
            # CNN feature maps then come out NHWC in memory: the stored layout, so the
            # float16 copy is a straight cast; convolutions are faster this way too.
            self.model = self.model.to(memory_format=torch.channels_last)
        if plan.transform is not None:
            self.transform = plan.transform
        else:
            from vitcnn_store.models import make_transform

            assert plan.data_config is not None
            self.transform = make_transform(plan.data_config)
        self._writer: RunWriter | None = None
        self._writer_lock = threading.Lock()
        self.torch_dtype = getattr(torch, plan.dtype)
        # Captured outputs are cast to the store dtype in the hooks: the copy that
        # protects them from in-place ops is also the float16 conversion.
        self.capture = Capture(
            self.model,
            plan.layers,
            plan.attention_layers,
            dtype=self.torch_dtype,
            reductions=plan.reductions,
        ).__enter__()
        self._forward_lock = threading.Lock()
        self._decoders: Any = None

    def _decoder_pool(self) -> Any:
        """Threads decoding one unit's images in parallel (PIL and torch release the GIL),
        each with one torch thread."""
        from concurrent.futures import ThreadPoolExecutor

        import torch

        if self._decoders is None:
            self._decoders = ThreadPoolExecutor(
                self.sizing.decode_threads,
                thread_name_prefix="vitcnn-decode",
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
        return self._decoders

    @property
    def writer(self) -> RunWriter:
        """The run's writer, opened at first use (the run may not exist at start-up)."""
        with self._writer_lock:
            if self._writer is None:
                # The driver's storage options for this store, in this worker's process.
                wanted = dict(self.plan.storage_options or {})
                if storage_options(self.plan.url) != wanted:  # an actor, not the driver
                    use_storage_options(self.plan.url, wanted)
                self._writer = RunWriter(self.plan.url, self.plan.run)
            return self._writer

    def close(self) -> None:
        """Remove the capture hooks and stop the decoding threads (the run's writer
        holds no threads or open files: it is dropped with the extractor)."""
        self.capture.__exit__(None, None, None)
        if self._decoders is not None:
            self._decoders.shutdown()
            self._decoders = None

    # -- stages ---------------------------------------------------------------------

    def decode(self, start: int, stop: int) -> Decoded:
        """Load and preprocess images ``start:stop``; failures become zero images.

        Each image is hashed from the bytes it is decoded from, so the write stage
        can refuse one that changed since the run recorded its hash.
        """
        import torch

        failed, reasons = np.zeros(stop - start, dtype=bool), [""] * (stop - start)
        digests = [""] * (stop - start)

        def one(i: int) -> torch.Tensor:
            try:
                image, digests[i - start] = self.plan.images.load_hashed(i)
                return self.transform(image)
            except ImageDecodeError as e:
                failed[i - start], reasons[i - start] = True, str(e)
                return torch.zeros(self.plan.input_size)

        indices = range(start, stop)
        if self.sizing.decode_threads > 1:
            tensors = list(self._decoder_pool().map(one, indices))
        else:
            tensors = [one(i) for i in indices]
        batch = torch.stack(tensors)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return Decoded(batch, failed, reasons, digests)

    def _host_buffers(self, n: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        import torch

        pin = self.device.type == "cuda"
        return {
            k: torch.empty((n, *s), dtype=self.torch_dtype, pin_memory=pin)
            for k, s in shapes.items()
        }

    def forward(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """Run the model over ``batch`` in mini-batches; arrays keyed like the store."""
        import torch

        with self._forward_lock:
            n, bs = batch.shape[0], self.plan.batch_size
            host: dict[str, torch.Tensor] | None = None
            use_autocast = self.plan.autocast and self.device.type == "cuda"
            for s in range(0, n, bs):
                x = batch[s : s + bs].to(self.device, non_blocking=True)
                if self.plan.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                    acts, attn = self.capture(x)
                out = {f"{k}/activation": v for k, v in acts.items()}
                out.update({f"{k}/attention": v for k, v in attn.items()})
                if self.plan.inputs:
                    out["input"] = x.permute(0, 2, 3, 1).to(self.torch_dtype)
                if s == 0 and bs >= n and self.device.type == "cpu":
                    # One mini-batch per unit on the CPU: the hooks' copies are the result.
                    return {k: v.contiguous().numpy() for k, v in out.items()}
                if host is None:
                    host = self._host_buffers(n, {k: tuple(v.shape[1:]) for k, v in out.items()})
                for key, t in out.items():
                    host[key][s : s + t.shape[0]].copy_(t, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            assert host is not None
            return {k: v.numpy() for k, v in host.items()}

    def _refuse_changed(self, unit: UnitValues) -> None:
        """Mark failed every image whose decoded bytes are not those the run recorded.

        The run's ``image_sha256`` was taken at planning; a file replaced since
        would otherwise be stored under the old hash with the new pixels.
        """
        start, stop = self.writer.units[unit.unit]
        recorded = self.writer.image_sha256(start, stop)
        if recorded is None:
            return
        for i, (was, now) in enumerate(zip(recorded, unit.digests, strict=True)):
            if not unit.failed[i] and was != now:
                unit.failed[i], unit.reasons[i] = True, CHANGED_REASON

    def write(self, unit: UnitValues) -> int:
        """Check ``unit``'s images and values, then write every array of it and flag it done."""
        self._refuse_changed(unit)
        ok = ~unit.failed
        check_finite(
            {k: v[ok] if not ok.all() else v for k, v in unit.values.items()}, self.plan.dtype
        )
        if unit.failed.any():
            for v in unit.values.values():
                v[unit.failed] = np.nan  # failed images stay NaN, flagged in `failed`
        self.writer.write_unit(unit.unit, unit.values, unit.failed, unit.reasons)
        return unit.n_images

    def extract(self, unit: int) -> UnitValues:
        """Decode and forward unit ``unit`` (no write)."""
        start, stop = self.writer.units[unit]
        decoded = self.decode(start, stop)
        return decoded.unit_values(unit, self.forward(decoded.batch))

    def run_unit(self, unit: int) -> int:
        """Extract and write unit ``unit``; returns the number of images written."""
        return self.write(self.extract(unit))


class NotLoadedError(RuntimeError):
    """A (restarted) actor was asked for a unit before it was given its model."""


def make_actor_class() -> Any:
    """The Ray actor class (built lazily so importing this module needs no Ray).

    The actor is created empty and then loaded with the plan and the driver's
    module from one object-store copy (:mod:`jobs.ray_pool`): it neither
    rebuilds nor rehashes the model. (References passed to a constructor would
    have to outlive every restart, which Ray does not guarantee and warns about;
    a restarted actor instead says :class:`NotLoadedError` and the driver loads
    it again.) It runs two unit calls at once (``max_concurrency=2``): the
    forward lock serialises the forwards, so the write of one unit overlaps the
    decode and forward of the next.

    An actor outlives its job when the driver parks it for the next job
    (:func:`jobs.ray_pool.stop_actors` with ``park``): ``unload`` drops what the job gave it,
    and ``load`` with another job's token replaces whatever it still held.
    """
    import ray

    @ray.remote
    class ExtractionActor:
        def __init__(self) -> None:
            self.extractor: UnitExtractor | None = None
            self.job = ""
            self._lock = threading.Lock()

        def load(
            self, plan: ExtractionPlan, model: Any, sizing: ExecutionPlan, job: str
        ) -> tuple[str, int]:
            """Take job ``job``'s plan, model and sizing; returns node and pid.

            Loading the job it holds already is a no-op (both unit calls of an
            actor restarted mid-job may ask); another job's load replaces it.
            """
            with self._lock:
                if self.extractor is None or self.job != job:
                    self._drop()
                    self.extractor, self.job = UnitExtractor(plan, model, sizing), job
            return ray.get_runtime_context().get_node_id(), os.getpid()

        def unload(self) -> int:
            """Drop the job's model and plan (the actor waits, parked, for another job);
            returns the pid."""
            with self._lock:
                self._drop()
            return os.getpid()

        def _drop(self) -> None:
            if self.extractor is None:
                return
            cuda = self.extractor.device.type == "cuda"
            self.extractor.close()
            self.extractor, self.job = None, ""
            import gc

            gc.collect()  # the module's tensors, now: a parked actor holds no model
            if cuda:
                import torch

                torch.cuda.empty_cache()

        def run_unit(self, unit: int) -> tuple[int, int, float]:
            if self.extractor is None:
                raise NotLoadedError(f"unit {unit}: this worker was restarted and holds no model")
            t0 = time.perf_counter()
            n = self.extractor.run_unit(unit)
            return unit, n, time.perf_counter() - t0

    return ExtractionActor
