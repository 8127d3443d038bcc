"""Stable fingerprints of what a Python caller hands in: a module, a transform.

``--resume`` compares them with what the run recorded, in another process,
maybe days later, so a fingerprint never includes a memory address (Python's
default ``repr`` does: ``<function f at 0x7f...>``) and changes whenever what
the object computes may have changed:

- :func:`module_sha256`: the module's class, its ``repr`` (every submodule and
  its settings: ReLU vs Tanh, strides, epsilons), every buffer (persistent or
  not) and every weight;
- :func:`callable_fingerprint`: for a function, its qualified name and a hash
  of its source, defaults and closure; for any other callable (a torchvision
  ``Compose``, a callable object), its ``repr`` and the fingerprints of the
  functions it holds (a ``Lambda``'s function).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["callable_fingerprint", "module_sha256", "stable_repr"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_DEPTH = 4  # how deep functions held by functions and objects are followed
#: Longest readable part of a fingerprint (the rest is summarised by its hash).
MAX_READABLE = 2000


def stable_repr(obj: Any) -> str:
    """``repr(obj)`` with memory addresses removed.

    Examples
    --------
    >>> stable_repr(object())
    '<object object>'
    """
    return _ADDRESS.sub("", repr(obj))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def module_sha256(model: torch.nn.Module) -> str:
    """sha256 over a module's whole configuration: class, ``repr``, buffers and weights.

    The weights alone do not identify a module: a ReLU replaced by a Tanh has
    no weights, and a non-persistent buffer is not in the state dict.

    Examples
    --------
    >>> import torch
    >>> relu = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> tanh = torch.nn.Sequential(relu[0], torch.nn.Tanh())
    >>> module_sha256(relu) == module_sha256(tanh)
    False
    """
    import torch

    h = hashlib.sha256()
    cls = type(model)
    h.update(f"{cls.__module__}.{cls.__qualname__}\n{stable_repr(model)}\n".encode())
    tensors = dict(model.named_buffers(remove_duplicate=False))
    tensors.update(model.state_dict())
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _function_digest(fn: Any, depth: int) -> str:
    """A hash of what a function computes: its source (or code), defaults and closure."""
    parts: list[str] = []
    try:
        parts.append(inspect.getsource(fn))
    except (OSError, TypeError):  # defined in a REPL or a notebook cell without source
        code = getattr(fn, "__code__", None)
        if code is not None:
            parts += [code.co_code.hex(), stable_repr(code.co_consts), repr(code.co_names)]
    parts.append(stable_repr(getattr(fn, "__defaults__", None)))
    parts.append(stable_repr(getattr(fn, "__kwdefaults__", None)))
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            parts.append(_fingerprint(cell.cell_contents, depth + 1))
        except ValueError:  # an empty cell
            parts.append("<empty>")
    return _sha("\n".join(parts))


def _is_function(obj: Any) -> bool:
    return isinstance(obj, functools.partial) or inspect.ismethod(obj) or inspect.isfunction(obj)


def _held_functions(obj: Any, depth: int) -> list[str]:
    """Fingerprints of the functions an object holds, looking into the callables it holds
    (a torchvision ``Compose``'s list of transforms, a ``Lambda``'s function): they do
    not show in its repr."""
    found: list[str] = []
    if depth > _MAX_DEPTH:
        return found
    for key, value in sorted(getattr(obj, "__dict__", {}).items()):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if _is_function(item):
                found.append(f"{key}: {_fingerprint(item, depth + 1)}")
            elif callable(item) and not inspect.isclass(item):
                found += _held_functions(item, depth + 1)
    return found


def _fingerprint(obj: Any, depth: int = 0) -> str:
    if depth > _MAX_DEPTH:  # e.g. a recursive closure: its name stands for it
        name = getattr(obj, "__qualname__", None)
        return f"{getattr(obj, '__module__', '')}.{name}" if name else stable_repr(obj)
    if isinstance(obj, functools.partial):
        args = ", ".join(stable_repr(a) for a in obj.args)
        kwargs = ", ".join(f"{k}={stable_repr(v)}" for k, v in sorted(obj.keywords.items()))
        return f"partial({_fingerprint(obj.func, depth + 1)}; {args}; {kwargs})"
    if inspect.ismethod(obj):
        func, owner = _fingerprint(obj.__func__, depth + 1), _fingerprint(obj.__self__, depth + 1)
        return f"{func} of {owner}"
    if inspect.isfunction(obj):
        digest = _function_digest(obj, depth)
        return f"{obj.__module__}.{obj.__qualname__} (function, sha256 {digest})"
    if inspect.isbuiltin(obj) or inspect.isclass(obj):
        return f"{getattr(obj, '__module__', None) or ''}.{obj.__qualname__}".lstrip(".")
    text = stable_repr(obj)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        text += f" (sha256 {module_sha256(obj)})"  # a module's weights are not in its repr
    held = _held_functions(obj, depth)
    return f"{text} [{'; '.join(held)}]" if held else text


def callable_fingerprint(fn: Any) -> str:
    """A readable fingerprint of a callable, the same in every process that has the same code.

    At most :data:`MAX_READABLE` characters; longer ones end with the hash of the whole.

    Examples
    --------
    >>> callable_fingerprint(len)
    'builtins.len'
    >>> def double(x):
    ...     return 2 * x
    >>> callable_fingerprint(double).startswith("vitcnn_store.models.fingerprint.double (function")
    True
    """
    text = _fingerprint(fn)
    if len(text) > MAX_READABLE:
        text = f"{text[:MAX_READABLE]}... (sha256 {_sha(text)})"
    return text
