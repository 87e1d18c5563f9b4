"""Load PyTorch checkpoints without running code hidden in them.

A checkpoint `.pth` is a pickle, and a pickle can call any function it names: `torch.load(weights_only=False)`,
the fix users share for XTuner's "Unsupported global" error on torch >= 2.6, runs whatever the file asks. We load
with torch's own restricted unpickler (`weights_only=True`) and allow, on top of tensors:
  - numpy arrays, dtypes and scalars (mmengine's log history keeps numpy arrays);
  - the XTuner/mmengine/DeepSpeed records listed in STAND_INS, which are not importable here: each becomes an inert
    StandIn that keeps the constructor arguments and pickled state as data and has no behaviour;
  - `getattr(HistoryBuffer, "min"|"max"|"current"|"mean")`, the one way HistoryBuffer's state uses getattr
    (protocol 2 pickles its methods that way); any other getattr is refused.
Any other global is refused with a UserError naming it. `trust=True` unpickles fully, for files the user vouches for.
"""
from __future__ import annotations

import _compat_pickle  # stdlib: the Python 2 <-> 3 name tables pickle itself uses
import pickle
import re
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

from common.cli import UserError, first_line, reading

# Classes that XTuner / mmengine / DeepSpeed checkpoints pickle -> the attributes a pickle may fetch from the class
# with getattr. Data, not code: nothing here is imported or called.
STAND_INS: dict[str, frozenset[str]] = {
    "mmengine.logging.history_buffer.HistoryBuffer": frozenset({"min", "max", "current", "mean"}),
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": frozenset(),
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": frozenset(),
    "deepspeed.utils.tensor_fragment.fragment_address": frozenset(),
    "deepspeed.runtime.zero.config.ZeroStageEnum": frozenset(),
}

TRUST_WARNING = (
    "WARNING: --trust-checkpoint: fully unpickling {path}. Any code hidden in this file runs now, with your "
    "permissions. Do this only for files you produced yourself or got from someone you trust."
)


class StandInType(type):
    """Metaclass so that `getattr(StandIn, "min")` on the class yields a named placeholder, not an error."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return StandInMember(cls.__qualname__, name)

    def __repr__(cls):
        return f"<stand-in for {cls.__module__}.{cls.__qualname__}>"


class StandIn(metaclass=StandInType):
    """An inert record of an object whose class is not importable here: its args and pickled state, nothing more."""

    def __new__(cls, *args, **kwargs):
        inst = super().__new__(cls)
        inst.args, inst.state = args, None
        return inst

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        # Stored as one value: never setattr() with names chosen by the file.
        self.state = state

    @property
    def value(self):
        """The enum value or first constructor argument (e.g. ZeroStageEnum(2) -> 2)."""
        return self.args[0] if self.args else None

    def __repr__(self):
        return f"{type(self).__qualname__}(args={self.args!r}, state={self.state!r})"


class StandInMember(str):
    """What `getattr(StandIn class, name)` returns: just the name (mmengine's statistic methods become strings)."""

    def __new__(cls, owner: str, name: str):
        return super().__new__(cls, f"{owner}.{name}")


def _make_stand_ins() -> dict[str, type]:
    out = {}
    for dotted in STAND_INS:
        module, _, name = dotted.rpartition(".")
        out[dotted] = StandInType(name, (StandIn,), {"__module__": module, "__qualname__": name})
    return out


_STAND_IN_CLASSES = _make_stand_ins()


def _restricted_getattr(obj, name):
    """The only getattr a pickle gets: a listed attribute of a stand-in class (HistoryBuffer.min and the like)."""
    dotted = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    if _STAND_IN_CLASSES.get(dotted) is obj and name in STAND_INS[dotted]:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"refused getattr({type(obj).__name__} {obj!r:.60}, {name!r:.40})")


def _numpy_globals() -> list:
    core = np._core.multiarray  # numpy >= 2; numpy 1.x pickles name numpy.core.multiarray
    plain_dtypes = "? b B h H i I l L q Q e f d g F D G".split()
    return [
        np.ndarray,
        np.dtype,
        (core._reconstruct, "numpy._core.multiarray._reconstruct"),
        (core._reconstruct, "numpy.core.multiarray._reconstruct"),
        (core.scalar, "numpy._core.multiarray.scalar"),
        (core.scalar, "numpy.core.multiarray.scalar"),
        # BUILD on a dtype checks the concrete dtype class (numpy.dtypes.Float64DType, ...): numbers only.
        *{type(np.dtype(c)) for c in plain_dtypes},
    ]


def _allowlist() -> list:
    return [
        *_numpy_globals(),
        *((cls, dotted) for dotted, cls in _STAND_IN_CLASSES.items()),
        (_restricted_getattr, "builtins.getattr"),
    ]


# What torch's restricted unpickler reports when a pickle asks for something outside the allowlist.
_REFUSED = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"refused (getattr\([^\n]*\))"),
    re.compile(r"(Can only (?:create|build) [^\n]*)"),
    re.compile(r"(Trying to call reduce for unrecognized function [^\n]*)"),
)


def _py3_name(what: str) -> str:
    """Protocol-2 pickles carry Python 2 names (`commands.Popen`) and torch drops `builtins.`: say it as Python 3."""
    if "(" in what:
        return what
    module, _, name = what.rpartition(".")
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module or 'builtins')}.{name}"


def _unpickler_error(path: Path, message: str) -> UserError:
    """A refusal naming what the pickle asked for, or (bad bytes, unsupported opcodes) why it cannot be read."""
    for pattern in _REFUSED:
        m = pattern.search(message)
        if m:
            what = _py3_name(m.group(1))
            return UserError(
                f"{path}: refused to load: its pickle asks for `{what}`, which is not a tensor, a numpy array "
                "or a known XTuner/DeepSpeed record, so loading it could run code. If you trust where this file came "
                "from, re-run with --trust-checkpoint")
    core = message.split("WeightsUnpickler error:")[-1]
    reason = next((line.strip() for line in core.splitlines()
                   if line.strip() and not line.startswith(("Check the documentation", "Weights only load failed"))),
                  "unknown error")
    return UserError(f"{path}: not a readable PyTorch checkpoint ({reason}); if it is one written with pickle "
                     "features the safe loader does not read and you trust where it came from, re-run with "
                     "--trust-checkpoint")


class _TrustingUnpickler(pickle.Unpickler):
    """Full unpickling (the user vouched for the file), with stand-ins for classes whose packages are missing here."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if f"{module}.{name}" in _STAND_IN_CLASSES:
                return _STAND_IN_CLASSES[f"{module}.{name}"]
            raise


_trusting_pickle = types.ModuleType("trusting_pickle")
_trusting_pickle.Unpickler = _TrustingUnpickler
_trusting_pickle.load = lambda f, **kw: _TrustingUnpickler(f, **kw).load()


def load(path: str | Path, trust: bool = False):
    """torch.load(path) on CPU without running code from the file (unless trust). UserError on refusal or bad file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    # mmap keeps RAM flat for multi-GB optimizer shards; only zip-format files support it.
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        _check_legacy_header(path)
    try:
        if trust:
            print(TRUST_WARNING.format(path=path), file=sys.stderr)
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=_trusting_pickle)
        with torch.serialization.safe_globals(_allowlist()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise _unpickler_error(path, str(e)) from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None
    except Exception as e:  # the boundary: torch's unpickler fails on damaged bytes with any error type
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None


def _check_legacy_header(path: Path) -> None:
    """A torch file is a zip archive, or (torch < 1.6) a pickle, which starts with the PROTO opcode: anything else is
    the wrong file, said plainly rather than as an unpickler's complaint about its first bytes."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:1] == b"\x80":
        return
    try:
        text = head.decode("utf-8")
        kind = "a text file" if text.isprintable() or "\n" in text else None
    except UnicodeDecodeError:
        kind = None
    kind = "an empty file" if not head else kind or f"it starts with bytes {head[:8].hex(' ')}"
    raise UserError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle: {kind})")


def load_tensors(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from a .safetensors file or a torch file holding a state dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise UserError(f"{path}: no such file")
        with reading(path, "not a readable safetensors file"):
            return load_file(path)
    obj = load(path, trust=trust)
    tensors = state_dict_in(obj)
    if tensors is None:
        raise UserError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    return tensors


def state_dict_in(obj) -> dict[str, torch.Tensor] | None:
    """The tensors of a checkpoint: the object itself or under mmengine's `state_dict` / DeepSpeed's `module`."""
    if not isinstance(obj, dict):
        return None
    for key in ("state_dict", "module", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors or None

