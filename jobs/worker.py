"""The extraction worker: decode → forward → device-to-host → zarr write, per work unit.

:class:`UnitExtractor` is plain Python (the benchmark runs it in-process);
:class:`ExtractionActor` wraps it as a Ray actor. The actor runs two unit calls
at once (``max_concurrency=2``): a lock serialises the forward passes, so the
zarr write of one unit overlaps the decode and forward of the next. A worker
builds its model (and checks its weights hash) when it starts, but opens the
run only at its first unit: the driver starts every worker before it creates
or replaces the run, so a pool that cannot start leaves the store untouched.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.capture import Capture
from vitcnn_store.data import ImageSet
from vitcnn_store.errors import ImageDecodeError, ModelError
from vitcnn_store.models import ModelSpec, build_model, make_transform, weights_sha256
from vitcnn_store.store import RunWriter
from vitcnn_store.store.writer import check_peaks

if TYPE_CHECKING:
    import torch

__all__ = ["ExtractionPlan", "UnitExtractor", "make_actor_class"]


@dataclass(frozen=True)
class ExtractionPlan:
    """Everything a worker needs, picklable; made once by the driver."""

    model: ModelSpec
    weights_sha256: str
    data_config: dict[str, Any]
    images: ImageSet
    url: str
    run: str
    layers: tuple[str, ...]
    attention_layers: tuple[str, ...]
    inputs: bool
    dtype: str
    batch_size: int
    device: str = "cpu"
    autocast: bool = False
    threads: int | None = None
    channels_last: bool = False


class UnitExtractor:
    """Extracts whole work units of one run. Thread-safe; forwards run one at a time."""

    def __init__(self, plan: ExtractionPlan) -> None:
        import torch

        if plan.threads:
            torch.set_num_threads(plan.threads)
        self.plan = plan
        self.device = torch.device(plan.device)
        model = build_model(plan.model)
        got = weights_sha256(model)
        if got != plan.weights_sha256:
            # Every worker must hold the very weights the driver recorded.
            raise ModelError(
                f"a worker built other weights than the driver ({got[:12]} != "
                f"{plan.weights_sha256[:12]}): the model is not deterministic on this node"
            )
        self.model = model.to(self.device)
        if plan.channels_last:
            # CNN feature maps then come out NHWC in memory: the stored layout, so the
            # float16 copy is a straight cast; convolutions are faster this way too.
            self.model = self.model.to(memory_format=torch.channels_last)
        self.transform = make_transform(plan.data_config)
        self._writer: RunWriter | None = None
        self._writer_lock = threading.Lock()
        self.torch_dtype = getattr(torch, plan.dtype)
        # Captured outputs are cast to the store dtype in the hooks: the copy that
        # protects them from in-place ops is also the float16 conversion.
        self.capture = Capture(
            self.model, plan.layers, plan.attention_layers, dtype=self.torch_dtype
        ).__enter__()
        self._forward_lock = threading.Lock()

    @property
    def writer(self) -> RunWriter:
        """The run's writer, opened at first use (the run may not exist at start-up)."""
        with self._writer_lock:
            if self._writer is None:
                self._writer = RunWriter(self.plan.url, self.plan.run)
            return self._writer

    def close(self) -> None:
        self.capture.__exit__(None, None, None)

    # -- stages ---------------------------------------------------------------------

    def decode(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        """Load and preprocess images ``start:stop``; failures become zero images."""
        import torch

        size = tuple(self.plan.data_config["input_size"])
        tensors, failed, reasons = [], np.zeros(stop - start, dtype=bool), [""] * (stop - start)
        for i in range(start, stop):
            try:
                tensors.append(self.transform(self.plan.images.load(i)))
            except ImageDecodeError as e:
                failed[i - start], reasons[i - start] = True, str(e)
                tensors.append(torch.zeros(size))
        batch = torch.stack(tensors)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch, failed, reasons

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

        n, bs = batch.shape[0], self.plan.batch_size
        host: dict[str, torch.Tensor] | None = None
        peaks: list[tuple[str, torch.Tensor]] = []  # one (min, max) pair per array and batch
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
            if host is None:
                host = self._host_buffers(n, {k: tuple(v.shape[1:]) for k, v in out.items()})
            for key, t in out.items():
                lo, hi = torch.aminmax(t.detach())  # one pass, no |t| temporary
                peaks.append((key, torch.maximum(-lo, hi).float()))
                host[key][s : s + t.shape[0]].copy_(t, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        assert host is not None
        self._check(peaks)
        return {k: v.numpy() for k, v in host.items()}

    def _check(self, peaks: list[tuple[str, torch.Tensor]]) -> None:
        import torch

        values = torch.stack([p for _, p in peaks]).cpu().numpy()  # one sync for all layers
        check_peaks(zip([k for k, _ in peaks], values, strict=True), self.plan.dtype)

    def run_unit(self, unit: int) -> int:
        """Extract and write unit ``unit``; returns the number of images written."""
        start, stop = self.writer.units[unit]
        batch, failed, reasons = self.decode(start, stop)
        with self._forward_lock:
            values = self.forward(batch)
        if failed.any():
            for v in values.values():
                v[failed] = np.nan  # failed images stay NaN, flagged in `failed`
        self.writer.write_unit(unit, values, failed, reasons)
        return stop - start


def make_actor_class() -> Any:
    """The Ray actor class (built lazily so importing this module needs no Ray)."""
    import ray

    @ray.remote
    class ExtractionActor:
        def __init__(self, plan: ExtractionPlan) -> None:
            self.extractor = UnitExtractor(plan)

        def run_unit(self, unit: int) -> tuple[int, int, float]:
            t0 = time.perf_counter()
            n = self.extractor.run_unit(unit)
            return unit, n, time.perf_counter() - t0

        def ready(self) -> tuple[str, int]:
            """Node and pid, once the model is built and its weights hash checked."""
            return ray.get_runtime_context().get_node_id(), os.getpid()

    return ExtractionActor
