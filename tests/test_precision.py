"""`auto` precision is chosen by the hardware (the capability query mocked both ways), one spelling of dtypes is
accepted everywhere, and an explicit emulated bf16 warns; on a real run, train.log says what was chosen and why."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import precision  # noqa: E402
from common.recipe import from_dict  # noqa: E402

NATIVE = precision.cpu_has_native_bf16()


def cpu(native: bool, slowdown: float = 150.0) -> precision.Hardware:
    """A CPU with or without native bf16, whose emulated products are `slowdown` times slower than float32."""
    return precision.Hardware(native_bf16=native, emulated_slowdown=slowdown)


def test_auto_on_a_cpu_without_native_bf16_is_float32():
    p = precision.resolve("auto", "cpu", cpu(False))
    assert p.dtype == torch.float32 and p.reason == "float32: this CPU has no native bfloat16" and p.warning is None


def test_auto_on_a_cpu_with_native_bf16_is_bfloat16():
    p = precision.resolve("auto", "cpu", cpu(True))
    assert p.dtype == torch.bfloat16 and "native bfloat16" in p.reason and p.warning is None


def test_explicit_bf16_without_native_support_warns_how_much_slower():
    p = precision.resolve("bf16", "cpu", cpu(False, slowdown=180.0))
    assert p.dtype == torch.bfloat16
    assert "emulated" in p.warning and "180x slower than float32" in p.warning and "`auto` would choose float32" in p.warning
    assert precision.resolve("bfloat16", "cpu", cpu(True)).warning is None
    assert precision.resolve("float32", "cpu", cpu(True)) == precision.Precision(torch.float32, "float32: as asked")


def test_this_machines_probes_decide_when_nothing_is_given():
    native = precision.cpu_has_native_bf16()
    assert precision.resolve("auto", "cpu").dtype == (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_follows_the_gpu(bf16, expected):
    p = precision.resolve("auto", "cuda", precision.Hardware(gpu_bf16=bf16))
    assert p.dtype == expected and ("loss scaling" in p.reason) == (not bf16)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, formerly DNNL_MAX_CPU_ISA) under which oneDNN has no bf16 matmul: the AVX2
# family and below. From AVX512_CORE up it keeps one (on a bf16 CPU capped at AVX512_CORE it measured 2x faster than
# float32 here), so those caps count as native.
ISA_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"}


def test_the_real_query_agrees_with_the_cpu_flags():
    """Both ways, against what the query does not read: on Linux, native bf16 exactly when /proc/cpuinfo lists
    avx512_bf16 or amx_bf16 and oneDNN is not capped below them (`ONEDNN_MAX_CPU_ISA=AVX2`, as the AVX2-limited
    runs in docs/performance.md are)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set(cpuinfo.read_text().split())
    hardware = bool(flags & {"avx512_bf16", "amx_bf16"})
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if NATIVE:
        assert flags & {"avx512_bf16", "amx_bf16"}
    assert NATIVE == (hardware and cap not in ISA_WITHOUT_BF16), (sorted(flags & {"avx512_bf16", "amx_bf16"}), cap)
    assert precision.cpu_description().startswith(torch.backends.cpu.get_cpu_capability())


def test_one_spelling_with_aliases():
    assert [precision.canonical(n) for n in ("fp32", "fp16", "bf16", "float32", "auto")] == \
        ["float32", "float16", "bfloat16", "float32", "auto"]
    with pytest.raises(ValueError):
        precision.canonical("float64")
    recipe = from_dict({"model": {"path": "m", "dtype": "bf16"}, "data": {"path": "d.json"}}, for_training=False)
    assert recipe.model.dtype == "bfloat16"


def train_one_step_auto(tmp_path, monkeypatch, model_dir) -> str:
    """train.py with `model.dtype: auto` for one step on four conversations; returns train.log."""
    import train
    from tests.test_train import write_recipe

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.json"
    data.write_text(json.dumps(json.loads((ROOT / "data" / "psych_sample.json").read_text(encoding="utf-8"))[:4],
                               ensure_ascii=False), encoding="utf-8")
    recipe = write_recipe(tmp_path, model_dir, data, model={"dtype": "auto"},
                          train={"max_steps": 1, "save_steps": 10}, evaluation={"prompts": []})
    assert train.main([str(recipe)]) == 0
    return (tmp_path / "recipe" / "train.log").read_text()


def test_train_log_says_what_auto_chose(tmp_path, monkeypatch, tiny_model_dir):
    chosen = precision.resolve("auto", "cpu")  # this machine's choice: float32, or bfloat16 where native
    log = train_one_step_auto(tmp_path, monkeypatch, tiny_model_dir)
    assert f"precision: {chosen.reason}" in log and "this CPU" in chosen.reason
    assert f"({chosen.name})" in log  # the model line


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16: bf16 training would be emulated (~200x slower)")
def test_bf16_training_where_native(tmp_path, monkeypatch, tiny_model_dir):
    log = train_one_step_auto(tmp_path, monkeypatch, tiny_model_dir)
    assert "precision: bfloat16: this CPU has native bfloat16" in log
