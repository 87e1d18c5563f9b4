"""A model directory's tensors, read lazily: names, shapes and dtypes from the file headers, each tensor read on
demand. The streaming merge (common/merging.py) and the GGUF export (common/gguf_export.py) both read through it,
so memory stays near the tensor at hand.

Its own module, not artifacts.py: artifacts knows which files a model has (`model_weight_files`, one rule) and stays
free of torch, which its callers (every script's argument handling) should not pay to import; reading tensor data is
safetensors' and common/safeload's business.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import _getdtype

from common import artifacts, safeload
from common.cli import UserError, reading


class ModelWeights:
    """The weights of a model directory: `shape`, `dtype` and `file_of` per tensor name, in file order."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files = artifacts.model_weight_files(self.path)
        if not self.files:
            raise UserError(f"{self.path}: no model weights (expected model.safetensors, a sharded index, or "
                            "pytorch_model.bin)")
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        for file in self.files:
            if file.suffix == ".safetensors":
                with reading(file, "not a readable safetensors file"), safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        part = f.get_slice(key)
                        self._add(key, file, tuple(part.get_shape()), _getdtype(part.get_dtype()))
            else:  # memory-mapped, so only the headers are read here
                for key, t in safeload.load_tensors(file).items():
                    self._add(key, file, tuple(t.shape), t.dtype)

    def _add(self, key, file, shape, dtype):
        self.file_of[key], self.shape[key], self.dtype[key] = file, shape, dtype

    @contextmanager
    def reader(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """`read(name) -> tensor`, memory-mapped. A safetensors file is opened for each tensor: its mapping, and the
        page cache that reading it makes resident, then lives exactly as long as that tensor, so a weight's pages are
        released as soon as it is used rather than when its whole file is done. A .bin (a pickle, read without running
        code from it) is mapped once."""
        bins: dict[Path, dict[str, torch.Tensor]] = {}

        def read(name: str) -> torch.Tensor:
            file = self.file_of[name]
            if file.suffix == ".safetensors":
                with reading(file, "not a readable safetensors file"), safe_open(file, framework="pt", device="cpu") as f:
                    return f.get_tensor(name)
            if file not in bins:
                bins[file] = safeload.load_tensors(file)
            return bins[file][name]

        yield read
        bins.clear()
