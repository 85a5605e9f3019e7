"""Reading checkpoints and pickles that may come from anyone, without running code from them.

A pickle can name any importable callable (``os.system``, ``builtins.eval``) and have it called while
loading, so a downloaded ``.pth`` or ``.pkl`` is a program. Every file sopvit reads goes through an
allowlist instead: ``torch.load(weights_only=True)`` plus exactly the extra types that our training
checkpoints (numpy RNG state) and the SOP/iBOT/DINO reference checkpoints (``argparse.Namespace``, numpy
scalars) hold, and, for plain pickles, an unpickler that knows only lists, dicts, str, numbers and
numeric numpy arrays. Anything else is refused before it is called, naming what the file asked for.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import codecs
import importlib
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

# Bool, int, float and complex: all that RNG states, numpy scalars and index arrays need. Object and
# structured arrays are refused too, though their members would still pass through the allowlist.
_NUMBER_CODES = "?bBhHiIlLqQefdgFDG"
_DTYPE_CLASSES = [type(np.dtype(code)) for code in _NUMBER_CODES]


class UnsafeFileError(ValueError):
    """A file needs a type outside the allowlist to be read; the message names the type and the file."""


class _Refused(pickle.UnpicklingError):
    """Raised inside the unpickler, which does not know the file's path; becomes an UnsafeFileError."""


def _numpy_module(name: str) -> ModuleType:
    # numpy 2 moved numpy.core to numpy._core; files written by either version name one of the two.
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _both_numpy_names(module: str, name: str) -> dict[str, Callable[..., Any]]:
    obj = getattr(_numpy_module(module), name)
    return {f"numpy.core.{module}.{name}": obj, f"numpy._core.{module}.{name}": obj}


def _torch_allowlist() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    named: dict[str, Callable[..., Any]] = {
        **_both_numpy_names("multiarray", "_reconstruct"),
        **_both_numpy_names("multiarray", "scalar"),
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
        "argparse.Namespace": argparse.Namespace,
    }
    # The dtype classes are never named by the file: torch checks them when it restores a dtype's state.
    return [*((obj, name) for name, obj in named.items()), *_DTYPE_CLASSES]


_TORCH_ALLOWED = _torch_allowlist()
_TORCH_ALLOWED_NAMES = {
    entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
    for entry in _TORCH_ALLOWED
}

# What torch's weights-only unpickler says when a file asks for something outside the allowlist.
_TORCH_REFUSALS = (
    re.compile(r"GLOBAL (\S+)"),
    re.compile(r"but got <class '([^']+)'>"),
    re.compile(r"unrecognized function (.+?)(?: which belongs to|$)", re.MULTILINE),
)


def _refusal(path: Path, names: Iterable[str], advice: str) -> UnsafeFileError:
    listed = ", ".join(sorted(set(names)))
    return UnsafeFileError(
        f"refusing to load {path}: it asks for {listed}, which sopvit does not load from files because "
        f"loading it could run code (the file may be malicious). {advice}"
    )


_TORCH_ADVICE = (
    "If you trust the file, convert it: load it with torch.load(weights_only=False) in a separate "
    "Python session and torch.save only its tensors and plain containers (or save a safetensors file)."
)


def safe_torch_globals() -> Any:
    """The context in which ``torch.load(weights_only=True)`` also accepts the allowlist's types."""
    return torch.serialization.safe_globals(_TORCH_ALLOWED)


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path)`` that refuses, with :class:`UnsafeFileError`, any type outside the allowlist.

    Damaged or foreign files raise what ``torch.load`` raises; the caller words those.
    """
    path = Path(path)
    try:
        # Read the file's list of globals first, so that the message names every offender at once.
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - _TORCH_ALLOWED_NAMES
    except Exception:  # not a zip checkpoint (legacy or damaged): the load below decides
        unsafe = set()
    if unsafe:
        raise _refusal(path, unsafe, _TORCH_ADVICE)
    try:
        with safe_torch_globals():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise refusal_or_reason(path, err) from err


def refusal_or_reason(path: Path, err: pickle.UnpicklingError) -> Exception:
    """What a weights-only ``torch.load`` of ``path`` failing with ``err`` means: an
    :class:`UnsafeFileError` naming the type it asked for, or the bare reason (torch wraps it in advice to
    retry with ``weights_only=False``: exactly what must not happen)."""
    text = str(err)
    detail = (text.partition("WeightsUnpickler error:")[2] or text).partition("Check the documentation")[0]
    for pattern in _TORCH_REFUSALS:
        match = pattern.search(detail)
        if match:
            return _refusal(path, [match.group(1).strip()], _TORCH_ADVICE)
    if not detail.strip():
        return err
    return pickle.UnpicklingError(" ".join(detail.split()))


def _numpy_dtype(spec: Any, *args: Any) -> np.dtype[Any]:
    dtype = np.dtype(spec, *args)
    if dtype.char not in _NUMBER_CODES:
        raise _Refused(f"numpy dtype {dtype}")
    return dtype


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles rebuild array bytes as _codecs.encode(text, "latin1"); no other codec is needed.
    if encoding != "latin1":
        raise _Refused(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


_PICKLE_ALLOWED: dict[str, Callable[..., Any]] = {
    **_both_numpy_names("multiarray", "_reconstruct"),
    **_both_numpy_names("multiarray", "scalar"),
    **_both_numpy_names("numeric", "_frombuffer"),  # arrays in protocol-5 pickles
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": _numpy_dtype,
    "_codecs.encode": _latin1,
    "builtins.bytes": bytes,
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Protocol < 3 pickles use Python 2 module names (__builtin__); pickle maps them, and so do we.
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _PICKLE_ALLOWED.get(f"{module}.{name}")
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def load_data_pickle(path: str | Path) -> Any:
    """A plain pickle of dicts, lists, str, numbers and numeric numpy arrays (e.g. a ground-truth file).

    Raises:
        UnsafeFileError: the file names any other type or function.
        pickle.UnpicklingError, EOFError: the file is damaged or not a pickle.
    """
    path = Path(path)
    advice = (
        "If you trust the file, re-save it holding only dicts, lists, str, numbers and numeric numpy "
        "arrays (the official ground-truth files do)."
    )
    with path.open("rb") as f:
        try:
            return _DataUnpickler(f).load()
        except _Refused as err:
            raise _refusal(path, [str(err)], advice) from err


def read_or_explain(
    load: Callable[[Path], Any], path: str | Path, problem: str, error: type[Exception] = ValueError
) -> Any:
    """``load(path)`` (:func:`load_torch` or :func:`load_data_pickle`), where any failure but a refusal
    becomes one ``error(f"{problem} (Type: reason)")``: torch and pickle raise many types for a damaged or
    foreign file, and the user needs to hear which file and what it was expected to be. A refusal
    (:class:`UnsafeFileError`) passes unchanged: its message names the file and the offending type, and
    "unreadable" would hide the danger."""
    try:
        return load(Path(path))
    except UnsafeFileError:
        raise
    except Exception as err:
        raise error(f"{problem} ({type(err).__name__}: {err})") from err
