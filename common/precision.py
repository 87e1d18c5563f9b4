"""Which floating-point precision to compute in: the one place that decides `auto`, for every script.

`auto` is chosen by the hardware, not by the checkpoint's config: a bf16 checkpoint on a CPU without native bf16
would otherwise run emulated bf16 matmuls, ~200x slower than float32 (measured on a 2-core AVX2 EPYC: 0.5 vs
100-110 GFLOP/s). CUDA: bf16 where the GPU has it, else fp16 (the Trainer adds loss scaling). CPU: bf16 only with
AVX512-BF16 or AMX that oneDNN can use, else float32.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # XTuner's spellings
CHOICES = ("auto", *DTYPES, *ALIASES)


def canonical(name: str) -> str:
    """`bf16` -> `bfloat16`; canonical names and `auto` pass through. ValueError for anything else."""
    name = ALIASES.get(name, name)
    if name != "auto" and name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (one of {', '.join(CHOICES)})")
    return name


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX in the CPU, and oneDNN (which runs torch's bf16 matmuls) allowed to use it.

    The second check matters: ONEDNN_MAX_CPU_ISA can cap oneDNN below the hardware, and plain AVX512 (no BF16)
    passes oneDNN's own bf16 check while still emulating the products."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch, or a CPU it cannot describe: assume none
        return False
    hardware = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return hardware and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_description() -> str:
    """`AVX512, native bf16 (avx512_bf16)`: what the bench and the logs report about this CPU."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        caps = {}
    flags = [f for f in ("avx512_bf16", "amx_bf16") if caps.get(f)]
    if cpu_has_native_bf16():
        bf16 = f"native bf16 ({', '.join(flags)})"
    else:
        bf16 = "no native bf16" + (f" ({', '.join(flags)} present, but oneDNN may not use it)" if flags else "")
    return f"{torch.backends.cpu.get_cpu_capability()}, {bf16}"


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    reason: str  # one line for the start-up summary: `float32: this CPU has no native bfloat16`
    warning: str | None = None  # an explicit choice that will run slowly here

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def slowdown(dtype: torch.dtype, n: int = 256) -> float:
    """How many times slower an n x n matmul runs in `dtype` than in float32 on this CPU (a ~50 ms probe)."""
    def seconds(dt):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        a @ b
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        return time.perf_counter() - start

    return seconds(dtype) / max(seconds(torch.float32), 1e-9)


@dataclass(frozen=True)
class Hardware:
    """What `resolve` goes by. Each fact is probed on this machine when asked for, unless given: the tests describe
    other machines with it (a CPU with or without native bf16, a GPU with or without bf16)."""

    native_bf16: bool | None = None  # this CPU's (cpu_has_native_bf16)
    gpu_bf16: bool | None = None  # the GPU's (torch.cuda.is_bf16_supported)
    emulated_slowdown: float | None = None  # how many times slower than float32 an emulated dtype multiplies

    def cpu_bf16(self) -> bool:
        return cpu_has_native_bf16() if self.native_bf16 is None else self.native_bf16

    def cuda_bf16(self) -> bool:
        return torch.cuda.is_bf16_supported() if self.gpu_bf16 is None else self.gpu_bf16

    def slowdown(self, dtype: torch.dtype) -> float:
        return slowdown(dtype) if self.emulated_slowdown is None else self.emulated_slowdown


def resolve(requested: str, device: str | None = None, hardware: Hardware = Hardware()) -> Precision:
    """The dtype to load and compute in. `requested`: auto or a dtype name/alias; device: cuda | cpu (default: cuda
    when available)."""
    name = canonical(requested)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        bf16 = hardware.cuda_bf16()
        if name == "auto":
            return (Precision(torch.bfloat16, "bfloat16: this GPU supports it") if bf16 else
                    Precision(torch.float16, "float16: this GPU has no bfloat16 (mixed precision with loss scaling)"))
        return Precision(DTYPES[name], f"{name}: as asked")
    native = hardware.cpu_bf16()
    if name == "auto":
        return (Precision(torch.bfloat16, "bfloat16: this CPU has native bfloat16 (AVX512-BF16/AMX)") if native else
                Precision(torch.float32, "float32: this CPU has no native bfloat16"))
    dtype = DTYPES[name]
    if dtype == torch.float32 or (dtype == torch.bfloat16 and native):
        return Precision(dtype, f"{name}: as asked")
    factor = hardware.slowdown(dtype)
    warning = (f"{name} on this CPU is emulated (no native support): its matrix products ran {factor:.0f}x slower "
               f"than float32 in a quick probe; `auto` would choose "
               f"{'bfloat16' if native else 'float32'} here") if factor > 2 else None
    return Precision(dtype, f"{name}: as asked", warning)
