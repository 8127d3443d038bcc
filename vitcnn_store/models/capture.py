"""Capture module outputs and attention probabilities in one forward pass.

:class:`Capture` is a context manager over a model: on entry it hooks the
chosen modules (and turns fused attention off on the attention modules whose
probabilities are wanted, since SDPA never materialises them); on exit it
removes every hook and restores every switch, so the model is left as found.

Outputs come back in the store's canonical layout:

- token layers ``(n, token, channel)``, prefix tokens included;
- spatial layers ``(n, y, x, channel)`` (CNN maps, transposed from NCHW);
- pooled layers ``(n, channel)``;
- attention ``(n, head, query, key)`` softmax probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import LayerPatternError
from vitcnn_store.store.schema import DIMS_BY_KIND, KIND_BY_NDIM

if TYPE_CHECKING:
    import torch

    from vitcnn_store.models.reduce import ResolvedReduction

__all__ = ["Capture", "LayerLayout", "output_shapes", "token_coordinates"]


@dataclass(frozen=True)
class LayerLayout:
    """Shape and coordinates of one captured array, per image (no image axis)."""

    name: str
    kind: str  # token | spatial | pooled | attention
    shape: tuple[int, ...]
    module_type: str
    depth_index: int
    coords: dict[str, np.ndarray] = field(default_factory=dict, compare=False)

    @property
    def dims(self) -> tuple[str, ...]:
        return DIMS_BY_KIND[self.kind]


def token_coordinates(
    model: torch.nn.Module, n_tokens: int, input_hw: tuple[int, int]
) -> dict[str, np.ndarray]:
    """``token_kind``, ``token_y``, ``token_x`` of a token sequence of ``model``.

    Patch tokens get the pixel centre of their patch in the model input (the
    image spans ``[0, W)``, so the first 16-px patch is centred at 8.0);
    prefix tokens (``cls``, then ``reg`` registers, as timm orders them) get NaN.
    A sequence the model's geometry does not explain gets kind ``other``.
    """
    pe = getattr(model, "patch_embed", None)
    patch = getattr(pe, "patch_size", None)
    kinds = np.full(n_tokens, "other", dtype=object)
    ty = np.full(n_tokens, np.nan, dtype=np.float32)
    tx = np.full(n_tokens, np.nan, dtype=np.float32)
    if patch is None:
        return {"token_kind": kinds.astype(str), "token_y": ty, "token_x": tx}
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    gh, gw = input_hw[0] // ph, input_hw[1] // pw
    n_prefix = int(getattr(model, "num_prefix_tokens", 0))
    n_cls = 1 if getattr(model, "cls_token", None) is not None else 0
    if n_tokens == gh * gw:
        n_prefix = n_cls = 0
    if n_tokens == n_prefix + gh * gw:
        kinds[:n_cls] = "cls"
        kinds[n_cls:n_prefix] = "reg"
        kinds[n_prefix:] = "patch"
        rows, cols = np.divmod(np.arange(gh * gw), gw)
        ty[n_prefix:] = (rows + 0.5) * ph
        tx[n_prefix:] = (cols + 0.5) * pw
    return {"token_kind": kinds.astype(str), "token_y": ty, "token_x": tx}


def _first_tensor(output: Any) -> torch.Tensor | None:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _canonical(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 4:
        return t.permute(0, 2, 3, 1)  # NCHW -> NHWC: channels last, as stored
    if t.ndim in (2, 3):
        return t
    raise LayerPatternError(
        f"layer {name!r} outputs shape {tuple(t.shape)}, which has no stored layout "
        "(token, spatial or pooled); choose another layer"
    )


class Capture:
    """Hooks that collect the outputs of ``layers`` (and attention of ``attention``).

    Parameters
    ----------
    model
        A model in eval mode.
    layers
        Module paths whose outputs to capture.
    attention
        Paths of attention modules whose softmax probabilities to capture.
    dtype
        Cast every captured tensor to this dtype inside the hook (default: keep
        the model's). Either way the hook takes a copy at once: later modules may
        modify a captured output in place (a ResNet block adds its shortcut onto
        the branch output and applies an in-place ReLU).
    reductions
        Per layer, a reduction (:mod:`vitcnn_store.models.reduce`) applied in the
        hook before the copy, so a reduced layer is never copied whole.

    Examples
    --------
    >>> import timm, torch
    >>> m = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32).eval()
    >>> with Capture(m, ["blocks.0"], attention=["blocks.0.attn"]) as cap:
    ...     acts, attn = cap(torch.zeros(2, 3, 32, 32))
    >>> tuple(acts["blocks.0"].shape), tuple(attn["blocks.0.attn"].shape)
    ((2, 5, 192), (2, 3, 5, 5))
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[str],
        attention: Sequence[str] = (),
        dtype: torch.dtype | None = None,
        reductions: Mapping[str, ResolvedReduction] | None = None,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.reductions = dict(reductions or {})
        self.layers = list(layers)
        self.attention = list(attention)
        modules = dict(model.named_modules())
        missing = [n for n in [*self.layers, *self.attention] if n not in modules]
        if missing:
            raise LayerPatternError(f"no module named {', '.join(missing)} in the model")
        for name in self.attention:
            module = modules[name]
            if not (hasattr(module, "fused_attn") and hasattr(module, "attn_drop")):
                raise LayerPatternError(
                    f"{name!r} ({type(module).__name__}) does not expose its attention "
                    "probabilities the way timm's attention modules do (a `fused_attn` switch "
                    "and an `attn_drop` applied to the softmax): it cannot be captured"
                )
        self._modules = modules
        self._handles: list[Any] = []
        self._saved_fused: dict[str, bool] = {}
        self._acts: dict[str, torch.Tensor] = {}
        self._attn: dict[str, torch.Tensor] = {}
        self.order: list[str] = []  # hook firing order of the last call: forward order
        self._calls: dict[str, int] = {}  # hook calls per captured array in the last call

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        # One copy, fused with the cast when there is one; contiguous in the stored layout.
        import torch

        dtype = self.dtype or t.dtype
        return t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)

    def _layer_hook(self, name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is None:
                raise LayerPatternError(f"layer {name!r} returns no tensor; choose another layer")
            if not t.is_floating_point():
                raise LayerPatternError(
                    f"layer {name!r} outputs {str(t.dtype).removeprefix('torch.')} values (indices "
                    "or masks, not activations): only floating-point outputs are stored; choose "
                    "another layer"
                )
            t = _canonical(name, t.detach())
            reduction = self.reductions.get(name)
            if reduction is not None:
                t = reduction.apply(t)
            self._acts[name] = self._copy(t)
            self.order.append(name)
            self._calls[name] = self._calls.get(name, 0) + 1

        return hook

    def _attention_hook(self, name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            # attn_drop is the identity in eval: its output is the softmax itself.
            self._attn[name] = self._copy(output.detach())
            self.order.append(name + "/attention")
            self._calls[name + "/attention"] = self._calls.get(name + "/attention", 0) + 1

        return hook

    def __enter__(self) -> Capture:
        for name in self.layers:
            self._handles.append(self._modules[name].register_forward_hook(self._layer_hook(name)))
        for name in self.attention:
            module = self._modules[name]
            self._saved_fused[name] = bool(module.fused_attn)
            module.fused_attn = False
            self._handles.append(module.attn_drop.register_forward_hook(self._attention_hook(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, fused in self._saved_fused.items():
            self._modules[name].fused_attn = fused
        self._saved_fused.clear()
        self._acts, self._attn = {}, {}

    def __call__(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Run the model on ``x`` and return (activations, attention) by path."""
        import torch

        if not self._handles and (self.layers or self.attention):
            raise RuntimeError("Capture must be used inside a `with` block")
        self._acts, self._attn, self.order, self._calls = {}, {}, [], {}
        with torch.inference_mode():
            self.model(x)
        acts, attn = self._acts, self._attn
        self._acts, self._attn = {}, {}
        self._refuse_repeated_calls()
        return acts, attn

    def _refuse_repeated_calls(self) -> None:
        """A module run more than once per forward (shared weights) has one stored array
        for several outputs: storing the last one would hide the others."""
        repeated = [(k, n) for k, n in self._calls.items() if n > 1]
        if repeated:
            key, n = repeated[0]
            what = (
                f"attention of {key.removesuffix('/attention')!r}"
                if key.endswith("/attention")
                else f"layer {key!r}"
            )
            raise LayerPatternError(
                f"{what} runs {n} times in one forward pass (a module called more than once, "
                "e.g. shared weights): only one output per image can be stored; choose a "
                "module that runs once"
            )

    def describe(self, x: torch.Tensor) -> dict[str, LayerLayout]:
        """Dry-run ``x`` (one image is enough) and describe every captured array.

        Keys are layer paths, and ``<attention module>/attention`` for attention.
        ``depth_index`` is the forward order in which the hooks fired.
        """
        acts, attn = self(x)
        return self.layouts(acts, attn, (int(x.shape[-2]), int(x.shape[-1])))

    def layouts(
        self,
        acts: Mapping[str, torch.Tensor],
        attn: Mapping[str, torch.Tensor],
        input_hw: tuple[int, int],
    ) -> dict[str, LayerLayout]:
        """Describe the arrays of the last call's outputs ``acts`` and ``attn``.

        Layers are described as captured without reductions (the template's
        capture has none; :mod:`vitcnn_store.models.reduce` derives the reduced
        layouts from these).
        """
        order = {name: i for i, name in enumerate(self.order)}
        out: dict[str, LayerLayout] = {}
        for name, t in acts.items():
            kind = KIND_BY_NDIM[t.ndim]
            coords: dict[str, np.ndarray] = {}
            if kind == "token":
                coords = token_coordinates(self.model, int(t.shape[1]), input_hw)
            elif kind == "spatial":
                h, w = int(t.shape[1]), int(t.shape[2])
                coords = {
                    "y": ((np.arange(h) + 0.5) * input_hw[0] / h).astype(np.float32),
                    "x": ((np.arange(w) + 0.5) * input_hw[1] / w).astype(np.float32),
                }
            out[name] = LayerLayout(
                name,
                kind,
                tuple(t.shape[1:]),
                type(self._modules[name]).__name__,
                order[name],
                coords,
            )
        for name, t in attn.items():
            key = name + "/attention"
            # Token coordinates too, so an attention-only group still says where its
            # queries and keys sit.
            coords = token_coordinates(self.model, int(t.shape[-1]), input_hw)
            out[key] = LayerLayout(
                key,
                "attention",
                tuple(t.shape[1:]),
                type(self._modules[name]).__name__,
                order[key],
                coords,
            )
        return out


def output_shapes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...] | None]:
    """Raw output shape of every module on input ``x`` (``None`` for non-tensor outputs).

    Modules that do not run in the forward pass are left out. Used by ``vitcnn layers``.
    """
    import torch

    shapes: dict[str, tuple[int, ...] | None] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(m: Any, a: Any, out: Any, name: str = name) -> None:
            t = _first_tensor(out)
            shapes.setdefault(name, tuple(t.shape) if t is not None else None)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes
