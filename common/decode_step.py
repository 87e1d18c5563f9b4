"""The one-token decode step compiled ahead of time (torch.export + AOTInductor), for answers on the CPU: a lone
answer's step, and a batch's (the server's concurrent answers, eval's, GRPO's group of completions).

Why: a decode step of a small model is ~1,500 small torch ops, each dispatched from Python; on a 2-core CPU they cost
as much as reading the weights (docs/decoding.md). Compiled, the step is one C++ function with those ops fused:
SmolLM2-135M decodes 2.5-3x faster (float32, AVX2; 2x after a ~1,900-token session), the same greedy tokens.
`torch.compile` in the process gives the same speed, but its tracing costs 40-100 s in every process (measured;
nothing caches it), and tracing on a thread beside the chat stalls the chat's own ops on the GIL. An AOTInductor
package is built once, by a separate process, and loads in milliseconds.

What is compiled is the model's *structure*, not its weights: the package holds no weights (the live model's own
tensors are handed to it at load, nothing is copied), so one build serves every model with the same config, dtype,
adapter shape and thread count (a base, its merge, every run's adapter of the same shape). The key is a hash of
that structure, the CPU capability torch dispatches to (a package compiled for AVX-512 dies of an illegal instruction
on an AVX2-only node sharing the same HF_HOME, which no `except` catches), the versions of torch, transformers and
peft, and the source of the code that builds the package (a change to the build makes packages built the old way
miss, with no number to bump by hand).

  DECODE_STEP_CACHE=DIR      where packages live (default HF_HOME/decode_steps); `off`: never use or build one
    KEY/step.pt2  KEY/batch.pt2     the built packages: a lone row's step, a batch's (one build makes both)
    KEY/decode_kernels.so           the packages' own operators (KERNEL, compiled by the build where they apply)
    KEY/spec.json                   what they were built for
    KEY.lock  KEY.log  KEY.failed   a build under way (its pid), its log, why it failed (not retried, and said
                                    once when a REPL or server starts: delete it to try again)
    KEY.spec.json  KEY.buffers.safetensors   the build's input, while it runs

Traced differently from the eager forward, the same computation: in the lone step, products as reductions over
the input features (`products_as_reductions`; in the batch step, on x86 CPUs with AVX2, products by an operator of
our own over the weights in blocks of 24 outputs (`products_in_blocks`, common/decode_kernels.cpp), each weight
read once for all rows from a copy laid out in blocks, made at the first batch step); the attention
(`one_query_attention`: the query heads grouped by the key/value head they share, the cache read as it is, not
repeated per group, by our own operator where it applies; a lone unpadded query needs no mask, a batch's rows a
mask of their padding); and the cache,
which lives in buffers with room that each step writes its position into in place (`BufferLayer`), where
transformers' DynamicCache allocates and copies the whole cache one position longer every step (at 2,000 cached
positions on SmolLM2 that copy, through fresh memory pages, cost 60 ms of a 100 ms step).

Used only where it is the same computation: on the CPU, the adapter as loaded, rows left-padded as common.decoding
keeps them (the eager batch's layout, so a step can go either way at any time). The first step of each package in a
process is checked against the eager step on the same input; a mismatch (a structure the key missed) switches both
off with a warning. Fused ops round differently in the last bits (logits differ by ~4e-5
on SmolLM2), which can tip a near-tie between two tokens; greedy answers were identical in every measured case.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from common.artifacts import atomic_dir, process_alive
from common.cli import first_line
from common.decoding import batchable

ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = "DECODE_STEP_CACHE"
PACKAGE, BATCH_PACKAGE, SPEC = "step.pt2", "batch.pt2", "spec.json"
MAX_ROWS = 256  # the most rows the batch package takes (the server's --max-batch)
# The first compiled step must match the eager one this closely (max |logit diff| over 1 + max |logit|): fused
# rounding is ~1e-6 of it, a wrong structure far more.
TOLERANCE = 1e-4
# The attention the build traces (registered with transformers under this name, for the build process only)
ONE_QUERY_ATTENTION = "decode_step_one_query"
# Operators of our own for float32 packages (KERNEL_SOURCE, why there): the batch's products (decode_step::blocked_mm
# over each weight laid out in blocks of BLOCK outputs: products_in_blocks) and both steps' attention
# (decode_step::one_query_attention, for the head dims in KERNEL_HEAD_DIMS). The build compiles them into the
# package's folder (KERNEL) with the compiler inductor uses, for the CPUs they are written for (KERNEL_CAPABILITIES:
# x86 with AVX2 and FMA); elsewhere the batch's products stay F.linear (MKL's) and the attention ATen's.
BLOCK = 24
KERNEL_SOURCE = Path(__file__).with_name("decode_kernels.cpp")
KERNEL = "decode_kernels.so"
KERNEL_CAPABILITIES = ("AVX2", "AVX512")
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)
KERNEL_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++20", "-shared", "-fPIC")
BATCH_EXAMPLE_ROWS = 4  # the batch package's example: rows are a dimension of its own only above 1
# What models hand their attention function that does not change what it computes for one unpadded query
HARMLESS_ATTENTION_ARGUMENTS = ("position_ids", "use_cache", "is_causal", "output_attentions")
# Config entries that name where a model came from, not what it computes
NOT_STRUCTURE = ("_name_or_path", "transformers_version", "base_model_name_or_path", "revision")


def cache_root() -> Optional[Path]:
    where = os.environ.get(CACHE_ENV, "")
    if where == "off":
        return None
    if where:
        return Path(where)
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "decode_steps"


class StepModule(torch.nn.Module):
    """The decode step of a batch of rows as a function of tensors only, as torch.export needs it: (input_ids
    [rows, 1], position_ids [rows, 1], padding [rows, 1], keys, values: one buffer [rows, kv heads, capacity, head
    dim] per layer, blocks) -> logits [rows, 1, vocab]. The rows are left-padded to a common width, as common.decoding
    keeps them: the buffers' first `filled` positions are the cache, of which row r's first padding[r] are padding and
    the rest its own positions[r] positions. Each row's new key and value are written into the buffers in place
    after the `filled`, so a step neither copies the cache nor allocates a longer one. `masked`: the attention
    hides each row's padding (a batch); without, a lone unpadded row sees every cached position. blocks: the
    weights of blocked_linears(model) in blocks, in that order, where their products were traced in blocks
    (products_in_blocks), else empty. The model's own forward runs inside, on a cache made of BufferLayers."""

    def __init__(self, model, masked: bool = False):
        super().__init__()
        self.model, self.masked = model, masked

    def forward(self, input_ids, position_ids, padding, keys: list[torch.Tensor], values: list[torch.Tensor],
                blocks: list[torch.Tensor]):
        for (_, linear), weight in zip(blocked_linears(self.model) if blocks else (), blocks):
            linear.blocks = weight  # what _blocks_forward multiplies by, for this call
        filled = (position_ids[0, 0] + padding[0, 0]).item()  # the same for every row
        cache = DynamicCache(config=self.model.config)
        cache.layers = [BufferLayer(k, v, filled) for k, v in zip(keys, values)]
        mask = None
        if self.masked:  # [rows, 1, 1, filled + 1]: True where the row has a position (transformers takes it as is)
            columns = torch.arange(keys[0].shape[2], device=padding.device).narrow(0, 0, filled + 1)
            mask = (columns >= padding)[:, None, None, :]
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, cache=cache,
                          use_cache=True).logits


class BufferLayer(DynamicLayer):
    """A cache layer over buffers with room (for tracing the step): the new position is written after the `filled`
    ones, in place, and attention sees the filled ones and it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled):
        super().__init__()
        torch._check(filled >= 0)
        torch._check(filled < keys.shape[2])
        self.lazy_initialization(keys, values)
        self.buffers_, self.filled = (keys, values), filled
        self.keys, self.values = keys.narrow(2, 0, filled), values.narrow(2, 0, filled)

    def update(self, key_states, value_states, *args, **kwargs):
        for buffer, new in zip(self.buffers_, (key_states, value_states)):
            buffer.narrow(2, self.filled, 1).copy_(new)
        self.keys, self.values = (buffer.narrow(2, 0, self.filled + 1) for buffer in self.buffers_)
        return self.keys, self.values


def room(tensor: torch.Tensor) -> int:
    """How many positions the buffer that `tensor` (a layer's cache [1, heads, positions, dim]) starts can hold, as
    its strides say (a plain tensor: its own length)."""
    return tensor.stride(1) // tensor.shape[3]


def capacity_for(positions: int, current: int) -> int:
    """The buffers' capacity for `positions`: the current one while it has room, else half as much again (one copy
    of the cache per ~1.5x growth, not one per step)."""
    return current if current >= positions else positions + max(256, positions // 2)


def with_room(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    """The buffer [1, heads, capacity, dim] that `tensor` (a layer's cache) starts, if it is one; else a new one with
    the tensor copied in (once an answer, and when it fills up)."""
    batch, heads, length, dim = tensor.shape
    if tensor.storage_offset() == 0 and tensor.stride() == (heads * capacity * dim, capacity * dim, dim, 1):
        return tensor.as_strided((batch, heads, capacity, dim), tensor.stride())
    buffer = tensor.new_empty((batch, heads, capacity, dim))
    buffer[:, :, :length] = tensor
    return buffer


def structure(model, cpu_capability: Optional[str] = None) -> Optional[dict]:
    """What the compiled step depends on (the package's key is its hash), or None where no package applies: not on
    the CPU, quantized, remote code, or cache layers that are not plain full attention (those a batch cannot share
    either). cpu_capability: the instruction set the package is for (default: what torch dispatches to here)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if (model.device.type != "cpu" or getattr(base, "hf_quantizer", None) is not None
            or getattr(config, "auto_map", None) or not batchable(DynamicCache(config=config))):
        return None
    adapters = {name: _plain(c.to_dict()) for name, c in getattr(model, "peft_config", {}).items()}
    baked = hashlib.sha256()
    for name, tensor in sorted(baked_buffers(model).items()):
        baked.update(name.encode() + tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {"config": _plain(config.to_dict()), "dtype": str(base.dtype).removeprefix("torch."),
            "adapters": adapters, "threads": torch.get_num_threads(),
            "baked_buffers": baked.hexdigest(), "versions": _versions(), "build": build_code(),
            "cpu_capability": cpu_capability or torch.backends.cpu.get_cpu_capability()}


def baked_buffers(model) -> dict[str, torch.Tensor]:
    """The model's buffers that are not saved with it (rotary inverse frequencies...): computed at load, and compiled
    into the package as they are (not handed over at load like the weights), so the build is given them."""
    return {f"{prefix}.{name}" if prefix else name: buffer
            for prefix, module in model.named_modules() for name, buffer in module.named_buffers(recurse=False)
            if name in module._non_persistent_buffers_set}


def _plain(d: dict) -> dict:
    """The entries of a config that are structure, as JSON would hold them (PEFT's target modules are a set)."""
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in NOT_STRUCTURE}, sort_keys=True,
                                 default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def _versions() -> dict:
    from importlib.metadata import version  # not `import peft`: a model without an adapter need not load it

    return {name: version(name) for name in ("torch", "transformers", "peft")}


def build_code() -> str:
    """A hash of the source of everything that shapes a package (the traced module, its cache layer and attention,
    the products, the export and compile call, and their settings)."""
    code = (StepModule, BufferLayer, build, products_as_reductions, one_query_attention, _reduction_forward,
            products_in_blocks, blocked_linears, blocked, _blocks_forward, compile_kernel)
    settings = json.dumps([BLOCK, KERNEL_CAPABILITIES, KERNEL_HEAD_DIMS, KERNEL_FLAGS, BATCH_EXAMPLE_ROWS],
                          sort_keys=True)
    source = "".join(inspect.getsource(part) for part in code) + KERNEL_SOURCE.read_text(encoding="utf-8")
    return hashlib.sha256((source + settings).encode()).hexdigest()[:16]


def key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


_FAILURES_SAID: set[str] = set()  # keys whose failed build this process has mentioned


class FastStep:
    """A model's compiled decode step: loaded when its package is on disk (looked for again at each step until then,
    so a build that finishes mid-session is picked up); until then, or once switched off, callers decode eagerly.
    The package reads the model's own tensors: they must not be replaced (a new adapter loaded, a move to another
    device) while it is in use."""

    def __init__(self, model, root: Path, spec: dict):
        self.model, self.root, self.spec, self.key = model, root, spec, key(spec)
        self.runners: dict[bool, object] = {}  # by masked: the batch's step (True), a lone row's (False)
        self.blocks: list[torch.Tensor] = []  # the batch step's weights in blocks (StepModule's `blocks`)
        self.blocked_from: list[tuple[torch.Tensor, int]] = []  # each block's weight and its version when copied
        self.verified: set[bool] = set()  # the runners whose first step matched the eager one
        self.steps = 0  # compiled steps taken by a lone row
        self.batch_steps = 0  # compiled steps taken by a batch of rows
        self.off: Optional[str] = None  # why it is not used (a failed load or check)

    @classmethod
    def for_model(cls, model, build: bool, root: Optional[Path] = None) -> Optional[FastStep]:
        """The model's FastStep, or None where none applies; build: start a background build when the package is
        missing (a process that answers many times: the REPL, the server), with a one-line note on stderr.
        root: where packages live (default: cache_root())."""
        root, spec = root or cache_root(), structure(model)
        if root is None or spec is None:
            return None
        fast = cls(model, root, spec)
        failed = root / f"{fast.key}.failed"
        if build and failed.is_file():
            if fast.key not in _FAILURES_SAID:  # once a process: a server loads each model once, a REPL once
                _FAILURES_SAID.add(fast.key)
                why = failed.read_text(encoding="utf-8", errors="replace").strip()
                print(f"note: the compiled decode step is not built for this model: its build failed before ({why}; "
                      f"log: {root / f'{fast.key}.log'}); decoding without it. Delete {failed} to try again",
                      file=sys.stderr)
        elif build and not (root / fast.key / PACKAGE).is_file():
            try:
                log = start_build(root, fast.key, spec, baked_buffers(model))
            except OSError as e:  # an unwritable or full cache: chat all the same
                print(f"warning: the compiled decode step cannot be built in {root} ({e.strerror or e}); decoding "
                      f"without it", file=sys.stderr)
                log = None
            if log is not None:
                print(f"note: compiling this model's decode step in a background process, once for its shape "
                      f"(a few minutes on a small CPU; log: {log}); answers use it when it is ready", file=sys.stderr)
        return fast

    def wait_for_build(self, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) while a build of this package is under way; whether the package is there.
        For callers that want the compiled step before they start (bench/decode.py, the tests)."""
        deadline = time.monotonic() + timeout
        while (self.root / f"{self.key}.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        return (self.root / self.key / PACKAGE).is_file()

    def ready(self) -> bool:
        """Whether the compiled steps can be used now (loads the packages the first time they are there)."""
        if self.runners or self.off is not None:
            return bool(self.runners)
        if not (self.root / self.key / PACKAGE).is_file():
            return False
        tensors = dict(StepModule(self.model).named_parameters(remove_duplicate=False))
        tensors.update(StepModule(self.model).named_buffers(remove_duplicate=False))
        runners = {}
        for masked, name in ((True, BATCH_PACKAGE), (False, PACKAGE)):
            package = self.root / self.key / name
            try:
                if (self.root / self.key / KERNEL).is_file():
                    load_kernel(self.root / self.key)
                runner = torch._inductor.aoti_load_package(str(package))
                runner.load_constants({name: tensors[name] for name in runner.get_constant_fqns()},
                                      check_full_update=True, user_managed=True)  # the model's tensors, not copies
            except Exception as e:  # a damaged or foreign package: decode as before, and say so once
                return self._switch_off(f"{package} could not be loaded ({type(e).__name__}: {first_line(e)})")
            runners[masked] = runner
        self.runners = runners
        return True

    def step(self, ids: torch.Tensor, positions: torch.Tensor, cache, eager: Callable[[], torch.Tensor]):
        """The logits [rows, vocab] of one token per row, their keys and values appended to the cache's layers (as
        views of buffers with room, which the next step writes into). The rows are left-padded to the cache's
        width (common.decoding): a row's padding is the width less its position. The first call of each package
        also runs `eager` (the model's own forward on the same cache) and compares."""
        layers = cache.layers
        before = [(layer.keys, layer.values) for layer in layers]
        rows, filled = before[0][0].shape[0], before[0][0].shape[2]
        padding = filled - positions
        masked = rows > 1
        if int(padding.min()) < 0 or rows > MAX_ROWS or (
                not masked and int(padding[0, 0]) != 0):
            return eager()  # not rows as common.decoding pads them after all: the model's own step
        if masked and uses_kernel(self.spec):  # the batch package multiplies by weights in blocks
            self._refresh_blocks()
        capacity = capacity_for(filled + 1, room(before[0][0]))  # one for all layers, as traced
        keys = [with_room(k, capacity) for k, _ in before]
        values = [with_room(v, capacity) for _, v in before]
        try:
            logits = self.runners[masked](ids, positions, padding, keys, values, self.blocks if masked else [])
        except Exception as e:  # the answer goes on eagerly rather than end in an error
            self._switch_off(f"it failed ({type(e).__name__}: {first_line(e)})")
            return eager()
        if masked not in self.verified:  # the eager step appends to the cache as it was (the buffers past it unseen)
            expected = eager()
            scale = 1 + expected.abs().amax(-1)  # per row
            gap = ((logits[:, -1] - expected).abs().amax(-1) / scale).max()
            if not float(gap) <= TOLERANCE:
                self._switch_off(f"its logits differ from the model's by {float(gap):.3g} (relative)")
                return expected
            self.verified.add(masked)
            return expected
        for layer, k, v in zip(layers, keys, values):
            layer.keys, layer.values = k.narrow(2, 0, filled + 1), v.narrow(2, 0, filled + 1)
        if masked:
            self.batch_steps += 1
        else:
            self.steps += 1
        return logits[:, -1]

    def _refresh_blocks(self) -> None:
        """The batch's weights in blocks (products_in_blocks), copied at the first batch step and again for a weight
        changed in place since (a full fine-tune's optimizer between GRPO's rollouts: tensors count their in-place
        writes)."""
        if not self.blocked_from:
            self.blocked_from = [(linear.weight, -1) for _, linear in blocked_linears(self.model)]
            self.blocks = [torch.empty(0)] * len(self.blocked_from)
        for i, (weight, version) in enumerate(self.blocked_from):
            if weight._version != version:
                with torch.no_grad():
                    self.blocks[i] = blocked(weight)
                self.blocked_from[i] = (weight, weight._version)

    def release(self, why: str = "released") -> None:
        """Free the packages: callers decode eagerly from here on. A loaded package keeps an extracted copy of itself
        in the temp folder (~4-8 MB) until it is freed; a process that ends without freeing it, as a server stopped by
        a signal does, would leave the copy behind."""
        self.off, self.runners, self.blocks, self.blocked_from = why, {}, [], []

    def _switch_off(self, why: str) -> bool:
        self.release(why)
        print(f"warning: the compiled decode step is not used: {why}; decoding as without it", file=sys.stderr)
        return False


# ---------------------------------------------------------------- building a package (in its own process)

def start_build(root: Path, key_: str, spec: dict, buffers: dict[str, torch.Tensor]) -> Optional[Path]:
    """Start `python -m common.decode_step ROOT KEY` in the background (niced, its own session: it outlives a short
    chat, and the chat keeps the CPU); returns its log, or None when a build is under way or has failed before."""
    root.mkdir(parents=True, exist_ok=True)
    lock, log = root / f"{key_}.lock", root / f"{key_}.log"
    if (root / f"{key_}.failed").exists():
        return None
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _builder_alive(lock):
            return None
        lock.unlink(missing_ok=True)  # its builder died: take over
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return None
    (root / f"{key_}.spec.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    save_file({name: t.detach().cpu().contiguous() for name, t in buffers.items()}, root / f"{key_}.buffers.safetensors")
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-m", "common.decode_step", str(root), key_], cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: os.nice(19))
    os.write(fd, str(proc.pid).encode())
    os.close(fd)
    return log


def _builder_alive(lock: Path) -> bool:
    try:
        text = lock.read_text().strip()
    except OSError:
        return False
    # empty: its builder made the lock and is writing its pid into it right now
    return not text or (text.isdigit() and process_alive(int(text)))


def build(spec: dict, buffers: dict[str, torch.Tensor], directory: Path) -> None:
    """Export and compile the decode steps of a model of this structure into `directory`: BATCH_PACKAGE (any
    number of left-padded rows, the attention masked, products in blocks: see products_in_blocks) and PACKAGE (one
    unpadded row, no mask, products as reductions: see products_as_reductions). The model is made without weights of
    its own (uninitialised memory: the packages are handed the live model's tensors at load, the batch's weights in
    blocks at each step), its baked buffers given."""
    from peft import get_peft_config, get_peft_model
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])  # the compiled kernels run on this many threads
    dtype = getattr(torch, spec["dtype"])
    config = AutoConfig.for_model(**spec["config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")  # every tensor is a constant of the package, given its value at load
    for name, adapter in spec["adapters"].items():
        model = get_peft_model(model, get_peft_config(adapter), adapter_name=name)
    model.eval()
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    with torch.inference_mode():  # the layers' cache shapes, from a forward of two positions
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.zeros(1, 2, dtype=torch.long), cache=cache, use_cache=True)
        shapes = [(layer.keys.shape[1], layer.values.shape[1], layer.keys.shape[3], layer.values.shape[3])
                  for layer in cache.layers]
    AttentionInterface.register(ONE_QUERY_ATTENTION, one_query_attention)
    model.set_attn_implementation(ONE_QUERY_ATTENTION)
    capacity = torch.export.Dim("capacity", min=2)  # one for all layers (FastStep.step gives them one)
    if uses_kernel(spec):  # from here on the traced attention is our operator's where it applies
        compile_kernel(directory)
        load_kernel(directory)
    # The example: `rows` rows of 8 positions' room, 3 filled, the first row's first one padding
    for rows, masked, package in ((BATCH_EXAMPLE_ROWS, True, BATCH_PACKAGE), (1, False, PACKAGE)):
        blocks = []
        if masked and uses_kernel(spec):
            products_in_blocks(model)  # from here on: a batch's products read each weight once for all rows
            blocks = [blocked(linear.weight) for _, linear in blocked_linears(model)]
        elif not masked:
            products_as_reductions(model)  # from here on: a lone row's products stream each weight once
        keys = [torch.zeros(rows, heads, 8, dim, dtype=dtype) for heads, _, dim, _ in shapes]
        values = [torch.zeros(rows, heads, 8, dim, dtype=dtype) for _, heads, _, dim in shapes]
        padding = torch.tensor([[1]] + [[0]] * (rows - 1)) if masked else torch.zeros(1, 1, dtype=torch.long)
        batch = {0: torch.export.Dim("rows", min=1, max=MAX_ROWS)} if masked else None
        dims = {"input_ids": batch, "position_ids": batch, "padding": batch,
                "keys": [{0: batch[0], 2: capacity} if batch else {2: capacity}] * len(keys)}
        dims["values"], dims["blocks"] = dims["keys"], [None] * len(blocks)
        with torch.no_grad():
            exported = torch.export.export(StepModule(model, masked),
                                           (torch.zeros(rows, 1, dtype=torch.long), 3 - padding, padding, keys,
                                            values, blocks), dynamic_shapes=dims, strict=False)
        torch._inductor.aoti_compile_and_package(exported, package_path=str(directory / package),
                                                 inductor_configs={"aot_inductor.package_constants_in_so": False})


def products_as_reductions(model) -> None:
    """Every nn.Linear of the model to be traced multiplies as an elementwise product summed over its input features.
    Traced so, inductor compiles each into one vectorised reduction that streams the weight at 25-29 GB/s here,
    against 17-22 GB/s for MKL's one-row products even split over the threads (common.decoding.split_products): a
    float32 decode step mostly reads weights. The sums run in another order (logits within ~1e-4 of the model's)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_reduction_forward, module)


def products_in_blocks(model) -> None:
    """The float32 products of the model to be traced (the batch step) that are worth it (blocked_linears) multiply
    their rows by their weight in blocks: the weight [out, in] as `blocked(weight)` [out/BLOCK, in, BLOCK], multiplied
    by decode_step::blocked_mm (common/decode_kernels.cpp: each block of the weight read once, in order, for all
    rows, their sums kept in registers): SmolLM2's 211 products at 8 rows in ~21 ms where inductor's C++ GEMM template
    took ~26 and MKL's 54-66 (2 cores limited to AVX2). The blocks are inputs of the step (StepModule's `blocks`,
    copied by FastStep from the live weights at the first batch step), not constants of the package: the packages are
    built without weights, and the live model's [out, in] weights are not in blocks. The other float32 nn.Linear (a
    LoRA adapter's rank-r halves) are traced as reductions, as in the lone step. Other dtypes keep F.linear."""
    blocks = {id(linear) for _, linear in blocked_linears(model)}
    for module in model.modules():
        if id(module) in blocks:
            module.forward = types.MethodType(_blocks_forward, module)
        elif type(module) is torch.nn.Linear and module.weight.dtype == torch.float32:
            module.forward = types.MethodType(_reduction_forward, module)


def blocked_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The layers whose products the batch step takes in blocks, in the model's order: every float32 nn.Linear with
    at least BLOCK inputs and outputs that is not half of a LoRA adapter (other dtypes keep F.linear: a bf16
    weight would be packed again at every step; an adapter's rank-r halves are a few kB, and GRPO's optimizer
    rewrites them at every step)."""
    adapters = {id(half) for module in model.modules() for name in ("lora_A", "lora_B")
                for half in getattr(module, name, {}).values()}
    return [(name, module) for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
            and min(module.weight.shape) >= BLOCK and id(module) not in adapters]


def blocked(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] as [ceil(out/BLOCK), in, BLOCK]: block b holds outputs b*BLOCK.. (zeros past `out`), each
    input's BLOCK weights side by side."""
    out, inputs = weight.shape
    padded = torch.nn.functional.pad(weight.detach(), (0, 0, 0, -out % BLOCK))
    return padded.view(-1, BLOCK, inputs).transpose(1, 2).contiguous()


def compile_kernel(directory: Path) -> None:
    """Compile KERNEL_SOURCE into `directory` as KERNEL (~8 s), with the compiler inductor uses and torch's headers
    and libraries; the compiler's messages go to the build's log."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    subprocess.run([get_cpp_compiler(), *KERNEL_FLAGS, abi, *(f"-I{p}" for p in include_paths()), str(KERNEL_SOURCE),
                    *(f"-L{p}" for p in library_paths()), "-ltorch", "-ltorch_cpu", "-lc10", "-o",
                    str(directory / KERNEL)], check=True)


def uses_kernel(spec: dict) -> bool:
    """Whether packages of this spec use our operators (float32, a CPU they are written for)."""
    return spec["dtype"] == "float32" and spec["cpu_capability"] in KERNEL_CAPABILITIES


def load_kernel(directory: Path) -> None:
    """Our operators registered in this process, from the KERNEL in `directory` (once a process: every package's is
    built from the same source, and a second library would register them again), with the shapes of their results
    for tracing."""
    if hasattr(torch.ops.decode_step, "blocked_mm"):
        return
    torch.ops.load_library(str(directory / KERNEL))
    torch.library.register_fake("decode_step::blocked_mm")(
        lambda rows, blocks: rows.new_empty((rows.shape[0], blocks.shape[0] * blocks.shape[2])))
    torch.library.register_fake("decode_step::one_query_attention")(
        lambda query, keys, values, padding, scale: torch.empty_like(query))


def _blocks_forward(self, x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.decode_step.blocked_mm(x.reshape(-1, x.shape[-1]), self.blocks)[:, :self.out_features]
    return (y if self.bias is None else y + self.bias).reshape(*x.shape[:-1], self.out_features)


def one_query_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of each row's one new position over the cache, as the compiled step needs it: the query heads
    grouped by the key/value head they share, so the cache is read as it is instead of copied once per group
    (transformers' `repeat_kv`, taken while tracing: 3x the cache written and read per step on SmolLM2).
    attention_mask: None for a lone, unpadded row (it sees every cached position, itself last), else a boolean
    [rows, 1, 1, positions] hiding each row's left padding (a query of one position needs nothing causal). Computed
    by our operator (decode_step::one_query_attention) where it is loaded (the build, for a package that uses it) and
    takes the head dim, else by ATen's SDPA."""
    extras = sorted(name for name, given in kwargs.items()
                    if name not in HARMLESS_ATTENTION_ARGUMENTS and given is not None and given is not False)
    if extras or dropout:  # softcapping, sinks, sliding windows...: this attention does not do them, so no package
        raise NotImplementedError(f"the compiled step's attention does not do {extras or ['dropout']}")
    batch, heads, length, dim = query.shape  # length 1
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1] * length, dim)
    if (hasattr(torch.ops.decode_step, "one_query_attention") and query.dtype == torch.float32
            and dim in KERNEL_HEAD_DIMS and value.shape[-1] == dim
            and (attention_mask is None or attention_mask.dtype == torch.bool)):
        # Our operator (loaded by the build where it applies); the mask hides each row's first positions
        padding = (torch.zeros(batch, 1, dtype=torch.long, device=query.device) if attention_mask is None
                   else (~attention_mask[:, 0, 0, :]).sum(-1, keepdim=True))
        out = torch.ops.decode_step.one_query_attention(grouped, key, value, padding,
                                                         dim ** -0.5 if scaling is None else scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                               scale=scaling)
    return out.reshape(batch, heads, length, value.shape[-1]).transpose(1, 2).contiguous(), None


def _reduction_forward(self, x: torch.Tensor) -> torch.Tensor:
    y = (x.unsqueeze(-2) * self.weight).sum(-1)
    return y if self.bias is None else y + self.bias


def main(argv: list[str]) -> int:
    """The background build: ROOT KEY (the spec beside it, written by start_build)."""
    root, key_ = Path(argv[0]), argv[1]
    try:
        spec = json.loads((root / f"{key_}.spec.json").read_text(encoding="utf-8"))
        buffers = load_file(root / f"{key_}.buffers.safetensors")
        with atomic_dir(root / key_) as tmp:
            (tmp / SPEC).write_text(json.dumps(spec, indent=1), encoding="utf-8")
            build(spec, buffers, tmp)
        return 0
    except BaseException as e:
        (root / f"{key_}.failed").write_text(f"{type(e).__name__}: {first_line(e)}\n", encoding="utf-8")
        raise
    finally:
        (root / f"{key_}.lock").unlink(missing_ok=True)
        (root / f"{key_}.spec.json").unlink(missing_ok=True)
        (root / f"{key_}.buffers.safetensors").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
