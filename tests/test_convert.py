"""convert.py: every source kind becomes a PEFT adapter giving the same logits; malicious pickles run nothing.

The XTuner and DeepSpeed checkpoints are built here as real pickles: their mmengine / DeepSpeed classes are defined
under the real module names only while writing, then removed, so loading sees them as not importable, as on a
machine without mmengine, XTuner or DeepSpeed.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import math
import os
import pickle
import pickletools
import runpy
import select
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.request
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import convert
from common import safeload
from common.converting import peft_key
from common.xtuner_config import xtuner_config_hints

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 5, 9, 33, 4, 17, 2, 40, 41, 42]])
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HUB_BASE = "internlm/internlm2-chat-7b"

# The globals a real `xtuner train` 0.2.0 / mmengine 0.10.6 iter_N.pth references (issue 4).
XTUNER_GLOBALS = {
    "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "numpy.ndarray",
    "numpy.dtype", "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar", "_codecs.encode",
    "mmengine.logging.history_buffer.HistoryBuffer", "__builtin__.getattr",
}


def xtuner_cfg(base: str, alpha: int = 16, target_modules: bool = False) -> str:
    """An XTuner config text as mmengine's `cfg.pretty_text` dumps it into meta['cfg'] (types become strings)."""
    targets = f"\n        target_modules={TARGETS!r}," if target_modules else ""
    return f"""SYSTEM = ''
accumulative_counts = 16
batch_size = 1
pretrained_model_name_or_path = {base!r}
prompt_template = 'xtuner.utils.PROMPT_TEMPLATE.internlm2_chat'
model = dict(
    llm=dict(
        pretrained_model_name_or_path={base!r},
        quantization_config=dict(
            bnb_4bit_compute_dtype='torch.float16',
            bnb_4bit_quant_type='nf4',
            load_in_4bit=True,
            type='transformers.BitsAndBytesConfig'),
        torch_dtype='torch.float16',
        trust_remote_code=True,
        type='transformers.AutoModelForCausalLM.from_pretrained'),
    lora=dict(
        bias='none',
        lora_alpha={alpha},
        lora_dropout=0.1,
        r=4,{targets}
        task_type='CAUSAL_LM',
        type='peft.LoraConfig'),
    type='xtuner.model.SupervisedFinetune',
    use_varlen_attn=False)
optim_wrapper = dict(
    optimizer=dict(betas=(0.9, 0.999), lr=0.0002, type='torch.optim.AdamW', weight_decay=0),
    type='mmengine.optim.AmpOptimWrapper')
"""


# --- fake mmengine / DeepSpeed classes, importable only while a checkpoint is being written ------------------------

class HistoryBuffer:
    """mmengine.logging.history_buffer.HistoryBuffer as it pickles: numpy arrays + its statistic methods."""

    def __init__(self, values):
        self.max_length = 1000000
        self._log_history = np.array(values, dtype=np.float64)
        self._count_history = np.ones(len(values), dtype=np.int64)
        # mmengine's __getstate__ stores its class-level _statistics_methods under this name
        self.statistics_methods = {n: getattr(HistoryBuffer, n) for n in ("min", "max", "current", "mean")}

    def min(self):
        return self._log_history.min()

    def max(self):
        return self._log_history.max()

    def current(self):
        return self._log_history[-1]

    def mean(self):
        return self._log_history.mean()


class LossScaler:
    def __init__(self, scale):
        self.cur_scale, self.cur_iter, self.dynamic = scale, 0, False


@dataclasses.dataclass
class fragment_address:  # noqa: N801 (DeepSpeed's name)
    numel: int
    start: int


class ZeroStageEnum(int, enum.Enum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


FAKES = {
    "mmengine.logging.history_buffer": HistoryBuffer,
    "deepspeed.runtime.fp16.loss_scaler": LossScaler,
    "deepspeed.utils.tensor_fragment": fragment_address,
    "deepspeed.runtime.zero.config": ZeroStageEnum,
}


@contextmanager
def fake_packages():
    """Register the fake classes under their real module names, for pickling only; remove them after."""
    added = []
    for module_name, cls in FAKES.items():
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        cls.__module__ = module_name
        setattr(sys.modules[module_name], cls.__name__, cls)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]
    assert importlib.util.find_spec("mmengine") is None and importlib.util.find_spec("deepspeed") is None


def message_hub():
    return {
        "log_scalars": {"train/loss": HistoryBuffer([2.31, 2.05, 1.87]), "train/lr": HistoryBuffer([2e-4, 2e-4])},
        "runtime_info": {"epoch": 0, "iter": 500, "max_iters": 3000, "loss_scale": np.float64(1024.0)},
        "resumed_keys": {"epoch": False, "iter": False},
    }


def mmengine_meta(cfg: str) -> dict:
    return {"cfg": cfg, "seed": 42, "experiment_name": "internlm2_chat_7b_qlora", "time": "20240618_101500",
            "mmengine_version": "0.10.6", "epoch": 0, "iter": 500, "dataset_meta": None}


def save_xtuner_pth(path: Path, state_dict: dict, cfg: str) -> Path:
    """An mmengine runner checkpoint as `xtuner train` writes iter_N.pth."""
    checkpoint = {
        "meta": mmengine_meta(cfg),
        "state_dict": OrderedDict(state_dict),
        "message_hub": message_hub(),
        "optimizer": {"state": {0: {"step": torch.tensor(500.0), "exp_avg": torch.zeros(3)}},
                      "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "weight_decay": 0, "params": [0]}]},
        "param_schedulers": [{"start_factor": 1e-5, "end_factor": 1.0, "base_values": [2e-4], "last_step": 500,
                              "by_epoch": False, "_global_step": 500, "verbose": False}],
    }
    with fake_packages():
        torch.save(checkpoint, path)
    return path


# --- models ---------------------------------------------------------------------------------------------------------

def load_base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def trained_lora(base_dir, modules_to_save=None, seed=1):
    """A PEFT model whose LoRA A and B are random (B != 0), so the adapter changes the logits."""
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                                                           modules_to_save=modules_to_save))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def xtuner_state_dict(model) -> dict:
    """Trainable parameters as XTuner's SupervisedFinetune names them: `llm.` + PEFT's name with `.default`."""
    return {f"llm.{k}": v.detach().clone() for k, v in model.state_dict().items()
            if "lora_" in k or "modules_to_save" in k}


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


@torch.no_grad()
def assert_same_logits_as(adapter_dir, base_dir, original):
    loaded = PeftModel.from_pretrained(load_base(base_dir), str(adapter_dir)).eval()
    torch.testing.assert_close(logits(loaded), logits(original))
    with original.disable_adapter():
        assert not torch.allclose(logits(original), logits(loaded), atol=1e-3), "the adapter must change the logits"


def run(argv, capsys):
    """convert.main in-process: (exit code, stdout, stderr)."""
    try:
        convert.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def lora(base):
    return trained_lora(base)


# --- source 2: XTuner iter_N.pth -------------------------------------------------------------------------------------

def pickle_globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_xtuner_pth_is_realistic_and_plain_weights_only_load_fails(tmp_path, lora):
    pth = save_xtuner_pth(tmp_path / "iter_500.pth", xtuner_state_dict(lora), xtuner_cfg(HUB_BASE))
    assert pickle_globals(pth) == XTUNER_GLOBALS
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL mmengine.logging.history_buffer"):
        torch.load(pth, weights_only=True)
    # Our loader reads it whole: HistoryBuffer is an inert record whose numpy history survives.
    obj = safeload.load(pth)
    buffer = obj["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, safeload.StandIn) and buffer.state["_log_history"].tolist() == [2.31, 2.05, 1.87]
    assert buffer.state["statistics_methods"]["mean"] == "HistoryBuffer.mean"
    assert obj["message_hub"]["runtime_info"]["loss_scale"] == 1024.0
    assert "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in obj["state_dict"]


def test_xtuner_pth_gives_same_logits(tmp_path, base, lora, capsys):
    pth = save_xtuner_pth(tmp_path / "iter_500.pth", xtuner_state_dict(lora), xtuner_cfg(str(base), alpha=16))
    code, out, err = run([pth], capsys)
    assert code == 0, err
    dst = tmp_path / "hf"  # default: sibling hf/
    assert "converted 28 adapter tensors (r=4, alpha=16)" in out and f"base: {base}" in out
    config = json.loads((dst / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16, 0.1)
    assert sorted(config["target_modules"]) == sorted(TARGETS)  # not in the config text: read from the tensors
    assert set(load_file(dst / "adapter_model.safetensors")) == set(get_peft_model_state_dict(lora))
    assert (dst / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob(".hf.*")), "temp dir left behind"
    assert_same_logits_as(dst, base, lora)


def test_xtuner_pth_with_modules_to_save_and_hub_base(tmp_path, base, capsys):
    model = trained_lora(base, modules_to_save=["lm_head"], seed=3)
    pth = save_xtuner_pth(tmp_path / "iter_9.pth", xtuner_state_dict(model), xtuner_cfg(HUB_BASE, target_modules=True))
    code, out, err = run([pth, tmp_path / "out"], capsys)  # base is a hub id: recorded, no tokenizer
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_BASE and config["modules_to_save"] == ["lm_head"]
    assert "tokenizer not copied" in err and not (tmp_path / "out" / "tokenizer_config.json").exists()
    code, out, err = run([pth, tmp_path / "out", "--base", base, "--force", "--verify"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert "verify: all 29 tensors loaded onto" in out
    assert_same_logits_as(tmp_path / "out", base, model)


XTUNER_FIXTURE = ROOT / "tests" / "fixtures" / "xtuner_pth"


def test_a_checkpoint_written_by_mmengine_converts(tmp_path, base, capsys):
    """Not our stand-ins: an iter_N.pth mmengine's own Runner wrote (tests/fixtures/xtuner_pth/make_fixture.py: real
    HistoryBuffers, optimizer and scheduler states, XTuner's config text). It pickles exactly the globals the fakes
    above pickle, and converts to the weights the model held, with r and alpha from its config text."""
    pth = XTUNER_FIXTURE / "iter_2.pth"
    assert pickle_globals(pth) == XTUNER_GLOBALS
    code, out, err = run([pth, tmp_path / "out", "--base", base, "--verify"], capsys)
    assert code == 0, err
    assert "converted 8 adapter tensors (r=2, alpha=8) from XTuner iter_N.pth" in out and "verify: all 8 tensors" in out
    expected = {peft_key(k): v for k, v in load_file(XTUNER_FIXTURE / "expected.safetensors").items()}
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (2, 8, 0.1)


def test_trust_checkpoint_loads_fully_with_a_loud_warning(tmp_path, base, lora, capsys):
    pth = save_xtuner_pth(tmp_path / "iter_500.pth", xtuner_state_dict(lora), xtuner_cfg(str(base)))
    code, out, err = run([pth, tmp_path / "out", "--trust-checkpoint"], capsys)
    assert code == 0, err
    assert "WARNING: --trust-checkpoint" in err and "runs now" in err
    assert_same_logits_as(tmp_path / "out", base, lora)


def test_xtuner_config_text_is_parsed_not_run(tmp_path):
    marker = tmp_path / "ran"
    text = (f"import os\nos.system('touch {marker}')\npretrained_model_name_or_path = '/models/internlm2'\n"
            "lora_r = 64\nmodel = dict(llm=dict(type=AutoModelForCausalLM.from_pretrained,\n"
            "    pretrained_model_name_or_path=pretrained_model_name_or_path),\n"
            "    lora=dict(type=LoraConfig, r=lora_r, lora_alpha=16, lora_dropout=0.1, bias='none',\n"
            "              target_modules=['wqkv', 'wo'], task_type='CAUSAL_LM'))\n")
    base, lora = xtuner_config_hints(text)
    assert base == "/models/internlm2"
    assert lora == {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "bias": "none", "target_modules": ["wqkv", "wo"]}
    assert not marker.exists()
    assert xtuner_config_hints("this is ( not python") == (None, {})


def test_peft_key_names():
    assert peft_key("llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert peft_key("llm.base_model.model.lm_head.modules_to_save.default.weight") == "base_model.model.lm_head.weight"
    assert peft_key("llm.base_model.model.lm_head.original_module.weight") is None
    assert peft_key("llm.base_model.model.model.embed_tokens.lora_embedding_A.default") == \
        "base_model.model.model.embed_tokens.lora_embedding_A"
    assert peft_key("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector.default.weight") == \
        "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"
    assert peft_key("model.layers.1.self_attn.v_proj.lora_B.weight") == \
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert peft_key("llm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") is None


# --- source 3: XTuner DeepSpeed iter_N.pth/ directories -------------------------------------------------------------

def zero_shards(params: dict[str, torch.Tensor], groups: list[list[str]], world: int, stage: int) -> list[dict]:
    """Per-rank ZeRO optimizer states, partitioned the way DeepSpeed does it."""
    ranks = [{"partitions": [], "mappings": [], "paddings": []} for _ in range(world)]
    for group in groups:
        if stage == 2:  # flatten the group, pad to 2*world, cut into equal slices
            flat = torch.cat([params[n].flatten() for n in group])
            padded = 2 * world * math.ceil(flat.numel() / (2 * world))
            flat = torch.cat([flat, torch.zeros(padded - flat.numel())])
            slices = list(flat.chunk(world))
        else:  # every param cut on its own into ceil(numel/world) pieces, last one padded
            slices = [[] for _ in range(world)]
            for n in group:
                k = math.ceil(params[n].numel() / world)
                p = torch.cat([params[n].flatten(), torch.zeros(k * world - params[n].numel())])
                for i in range(world):
                    slices[i].append(p[i * k:(i + 1) * k])
            slices = [torch.cat(s) for s in slices]
        starts = [0, *np.cumsum([params[n].numel() for n in group])[:-1].tolist()]
        mapping = OrderedDict((n, fragment_address(numel=params[n].numel(), start=s)) for n, s in zip(group, starts))
        padding = slices[-1].numel() * world - sum(params[n].numel() for n in group)
        for i, r in enumerate(ranks):
            r["partitions"].append(slices[i].clone())
            r["mappings"].append(mapping)
            r["paddings"].append(padding if i == world - 1 else 0)
    shards = []
    for r in ranks:
        osd = {
            "loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
            "base_optimizer_state": {"state": {g: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(p),
                                                   "exp_avg_sq": torch.zeros_like(p)}
                                               for g, p in enumerate(r["partitions"])},
                                     "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "params": [g]}
                                                      for g in range(len(groups))]},
            "zero_stage": ZeroStageEnum.gradients if stage == 2 else ZeroStageEnum.weights,
            "partition_count": [world] * len(groups) if stage == 2 else world,
            "ds_version": "0.15.4",
        }
        if stage == 2:
            osd.update(single_partition_of_fp32_groups=r["partitions"], group_paddings=r["paddings"],
                       param_slice_mappings=r["mappings"])
        else:
            osd.update(fp32_flat_groups=r["partitions"])
        shards.append({"optimizer_state_dict": osd, "ds_config": {"zero_optimization": {"stage": stage}},
                       "ds_version": "0.15.4"})
    return shards


def save_deepspeed_dir(path: Path, params: dict[str, torch.Tensor], cfg: str, stage: int, world: int = 2) -> Path:
    """XTuner + mmengine DeepSpeedStrategy's iter_N.pth/ directory (exclude_frozen_parameters=True)."""
    path.mkdir(parents=True)
    names = list(params)
    groups = [[n for n in names if "lora_A" in n], [n for n in names if "lora_A" not in n]]  # 2 param groups
    model_states = {
        # ZeRO-2 keeps the bf16 weights in `module`; ZeRO-3 only empty placeholders.
        "module": OrderedDict((n, p.to(torch.bfloat16) if stage == 2 else torch.empty(0)) for n, p in params.items()),
        "buffer_names": [], "optimizer": None,
        "param_shapes": [OrderedDict((n, params[n].shape) for n in g) for g in groups],
        "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None,
        "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
        "global_steps": 500, "global_samples": 1000, "dp_world_size": world, "mp_world_size": 1,
        "ds_config": {"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}, "ds_version": "0.15.4",
        # mmengine's client state
        "meta": mmengine_meta(cfg), "message_hub": message_hub(), "param_schedulers": [{"last_step": 500}],
    }
    with fake_packages():
        model_files = ["mp_rank_00_model_states.pt"] if stage == 2 else \
            [f"zero_pp_rank_{i}_mp_rank_00_model_states.pt" for i in range(world)]
        for name in model_files:
            torch.save(model_states, path / name)
        for i, shard in enumerate(zero_shards(params, groups, world, stage)):
            torch.save(shard, path / f"bf16_zero_pp_rank_{i}_mp_rank_00_optim_states.pt")
    return path


@pytest.mark.parametrize("stage,world", [(2, 2), (2, 3), (3, 2), (3, 3)])
def test_deepspeed_dir_gives_same_logits(tmp_path, base, lora, stage, world, capsys):
    src = save_deepspeed_dir(tmp_path / "iter_500.pth", xtuner_state_dict(lora), xtuner_cfg(str(base)), stage, world)
    code, out, err = run([src], capsys)
    assert code == 0, err
    assert f"XTuner DeepSpeed ZeRO-{stage} directory ({world} ranks)" in out and "28 adapter tensors" in out
    if world == 3:  # 3 ranks do not divide the sizes: the shards carry padding that must be cut off
        last = safeload.load(src / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        flat = last["single_partition_of_fp32_groups" if stage == 2 else "fp32_flat_groups"]
        assert sum(t.numel() for t in flat) * world > sum(t.numel() for t in xtuner_state_dict(lora).values())
    # fp32 master weights, not the bf16 copy: logits match the fp32 original exactly
    assert_same_logits_as(tmp_path / "hf", base, lora)


def test_deepspeed_dir_with_a_missing_shard_is_refused(tmp_path, base, lora, capsys):
    src = save_deepspeed_dir(tmp_path / "iter_500.pth", xtuner_state_dict(lora), xtuner_cfg(str(base)), stage=3)
    (src / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    code, out, err = run([src], capsys)
    assert code == 2 and "ZeRO ran on 2 ranks but 1 *_optim_states.pt files" in err and err.count("\n") == 1
    for shard in src.glob("*_optim_states.pt"):  # ZeRO-3 model states alone hold only empty placeholders
        shard.unlink()
    code, out, err = run([src], capsys)
    assert code == 2 and "partitioned across ZeRO-3 *_optim_states.pt files" in err


def test_deepspeed_layout_with_latest_and_no_optimizer(tmp_path, base, lora, capsys):
    """DeepSpeed's own layout (DIR/latest -> tag dir); without shards, ZeRO-2's bf16 `module` copy is used."""
    tag = save_deepspeed_dir(tmp_path / "ckpt" / "global_step500", xtuner_state_dict(lora), xtuner_cfg(str(base)),
                             stage=2)
    (tmp_path / "ckpt" / "latest").write_text("global_step500\n")
    for shard in tag.glob("*_optim_states.pt"):
        shard.unlink()
    code, out, err = run([tmp_path / "ckpt", tmp_path / "out"], capsys)
    assert code == 0, err
    assert "model states only" in out
    loaded = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {v.dtype for v in loaded.values()} == {torch.bfloat16}
    expected = get_peft_model_state_dict(lora)
    for k, v in loaded.items():
        torch.testing.assert_close(v.float(), expected[k].to(torch.bfloat16).float())


DEEPSPEED_FIXTURES = ROOT / "tests" / "fixtures" / "deepspeed_zero"


@pytest.mark.parametrize("stage,world", [(2, 2), (2, 3), (3, 2), (3, 3)])
def test_a_checkpoint_written_by_deepspeed_gives_deepspeeds_own_fp32_weights(tmp_path, base, stage, world, capsys):
    """Not our model of ZeRO: checkpoints DeepSpeed itself wrote (tests/fixtures/deepspeed_zero/make_fixture.py: a LoRA
    under XTuner's `llm.`, bf16, two param groups, `world` CPU ranks, frozen parameters excluded). The adapter holds
    exactly the fp32 weights DeepSpeed's own zero_to_fp32 rebuilds from the same files, and loads onto the base."""
    src = DEEPSPEED_FIXTURES / f"zero{stage}_world{world}"
    code, out, err = run([src, tmp_path / "out", "--base", base, "--alpha", "8", "--verify"], capsys)
    assert code == 0, err
    assert f"DeepSpeed ZeRO-{stage} directory ({world} ranks)" in out and "verify: all 8 tensors loaded onto" in out
    expected = {peft_key(k): v for k, v in load_file(src / "expected.safetensors").items()}
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert got.keys() == expected.keys() and len(got) == 8
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (2, 8, ["q_proj", "v_proj"])


# --- source 4: plain state dicts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["safetensors", "pt", "bin"])
def test_plain_state_dict_with_base(tmp_path, base, lora, kind, capsys):
    if kind == "safetensors":  # PEFT's saved names
        src = tmp_path / "lora.safetensors"
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(lora).items()}, src)
    else:  # the PeftModel's own parameter names (with `.default`), as torch.save(model.state_dict()) gives
        src = tmp_path / f"lora.{kind}"
        torch.save({k: v for k, v in lora.state_dict().items() if "lora_" in k}, src)
    code, out, err = run([src, tmp_path / "out"], capsys)
    assert code == 2 and "pass --base" in err
    code, out, err = run([src, tmp_path / "out", "--base", base, "--alpha", "16"], capsys)
    assert code == 0, err
    assert_same_logits_as(tmp_path / "out", base, lora)


# --- source 1: our own checkpoint-N ---------------------------------------------------------------------------------

def trainer_checkpoint(run_dir: Path, model, base, tokenizer, marker) -> Path:
    """An HF Trainer checkpoint-N of a PEFT model, with optimizer/args pickles that must never be unpickled."""
    ckpt = run_dir / "checkpoint-20"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/gone/old/base"  # the base moved since training
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    recipe = {"model": {"path": str(base)}, "lora": {"r": 4, "alpha": 16}, "data": {"path": "data/x.json"}}
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save(Reduce(os.system, f"touch {marker}"), ckpt / name)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": []}))
    return ckpt


def test_own_checkpoint_round_trips(tmp_path, base, lora, tokenizer, capsys):
    marker = tmp_path / "unpickled"
    ckpt = trainer_checkpoint(tmp_path / "run", lora, base, tokenizer, marker)
    code, out, err = run([ckpt, "--verify"], capsys)
    assert code == 0, err
    dst = tmp_path / "run" / "hf"
    produced = {p.name for p in dst.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "tokenizer_config.json"} <= produced
    assert not produced & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"}
    assert not marker.exists(), "a training pickle was unpickled"
    # the dead base path is replaced by the recipe's, which exists; everything else in the config is kept
    config = json.loads((dst / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["lora_alpha"] == 16
    original = load_file(ckpt / "adapter_model.safetensors")
    assert {k: v.tolist() for k, v in load_file(dst / "adapter_model.safetensors").items()} == \
        {k: v.tolist() for k, v in original.items()}
    assert "verify: all 28 tensors loaded onto" in out
    assert_same_logits_as(dst, base, lora)
    # converting the converted directory again changes nothing (idempotent)
    code, out, err = run([dst, tmp_path / "again"], capsys)
    assert code == 0, err
    assert load_file(tmp_path / "again" / "adapter_model.safetensors").keys() == original.keys()


def test_own_full_finetune_checkpoint(tmp_path, base, capsys):
    model = load_base(base)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)
    ckpt = tmp_path / "run" / "checkpoint-5"
    model.save_pretrained(ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"never read")
    code, out, err = run([ckpt, tmp_path / "merged"], capsys)
    assert code == 0, err
    assert "model tensors (full fine-tune)" in out
    assert not (tmp_path / "merged" / "optimizer.pt").exists()
    torch.testing.assert_close(logits(load_base(tmp_path / "merged")), logits(model))


def test_xtuner_full_finetune_pth_needs_and_uses_base_config(tmp_path, base, capsys):
    model = load_base(base)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    pth = save_xtuner_pth(tmp_path / "iter_1.pth", {f"llm.{k}": v for k, v in model.state_dict().items()},
                          xtuner_cfg("/nowhere/base"))
    code, out, err = run([pth, tmp_path / "out"], capsys)
    assert code == 2 and "pass --base DIR" in err
    code, out, err = run([pth, tmp_path / "out", "--base", base], capsys)
    assert code == 0, err
    torch.testing.assert_close(logits(load_base(tmp_path / "out")), logits(model))


# --- malicious pickles: refused, nothing runs ------------------------------------------------------------------------

class G:
    """A global in a hand-assembled pickle."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args


def assemble(obj) -> bytes:
    """Protocol-2 pickle bytes for a tree of G / Call / list / str (what a crafted file would contain)."""

    def emit(o):
        if isinstance(o, G):
            return b"c" + o.module.encode() + b"\n" + o.name.encode() + b"\n"
        if isinstance(o, Call):
            return emit(o.func) + b"(" + b"".join(emit(a) for a in o.args) + b"tR"
        if isinstance(o, list):
            return b"](" + b"".join(emit(a) for a in o) + b"e"
        data = o.encode()
        return b"X" + len(data).to_bytes(4, "little") + data

    return b"\x80\x02" + emit(obj) + b"."


def getattr_(obj, name):
    return Call(G("__builtin__", "getattr"), obj, name)


def touch(marker):
    return f"open({str(marker)!r}, 'w').close()"


def exec_via_getattr_chain(marker):
    """exec(...) reached only through getattr calls on an allowlisted torch function."""
    module_globals = getattr_(G("torch._utils", "_rebuild_tensor_v2"), "__globals__")
    builtins_dict = Call(getattr_(module_globals, "get"), "__builtins__")
    return Call(Call(getattr_(builtins_dict, "get"), "exec"), touch(marker))


class Reduce:
    """An object whose unpickling calls func(*args): the classic `__reduce__` payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def write_payload(kind: str, path: Path, witness: "Witness") -> tuple[Path, str]:
    """Write the payload `kind` to path, aimed at the witness's targets; returns (path, what the refusal must name)."""
    marker, port = witness.marker, witness.port
    delayed = f"sleep {DELAY_S} && touch {marker}"
    reduced = {  # written by pickle itself, through __reduce__
        # process: a shell, a child process (at once and a second later, after the load has returned), a spawn
        "os_system": (lambda: Reduce(os.system, f"touch {marker}"), "posix.system"),
        "subprocess_popen": (lambda: Reduce(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
        "subprocess_popen_delayed": (lambda: Reduce(subprocess.Popen, ["sh", "-c", delayed]), "subprocess.Popen"),
        "os_posix_spawn": (lambda: Reduce(os.posix_spawn, "/usr/bin/touch", ["touch", str(marker)], {}),
                           "posix.posix_spawn"),
        # code
        "builtins_eval": (lambda: Reduce(eval, touch(marker)), "builtins.eval"),
        "builtins_exec": (lambda: Reduce(exec, touch(marker)), "builtins.exec"),
        # filesystem: create, delete a file, delete a tree
        "builtins_open": (lambda: Reduce(open, str(marker), "w"), "io.open"),
        "os_remove": (lambda: Reduce(os.remove, str(witness.victim_file)), "posix.remove"),
        "shutil_rmtree": (lambda: Reduce(shutil.rmtree, str(witness.victim_dir)), "shutil.rmtree"),
        # network: a connection to a listener on loopback, and an HTTP request to it
        "socket_connect": (lambda: Reduce(socket.create_connection, ("127.0.0.1", port)), "socket.create_connection"),
        "urllib_urlopen": (lambda: Reduce(urllib.request.urlopen, f"http://127.0.0.1:{port}/", None, 0.2),
                           "urllib.request.urlopen"),
        # import machinery: run a script, unpickle or torch.load a second payload
        "runpy_run_path": (lambda: Reduce(runpy.run_path, str(witness.script)), "runpy.run_path"),
        "nested_pickle_loads": (lambda: Reduce(pickle.loads, pickle.dumps(Reduce(os.system, f"touch {marker}"))),
                                "pickle.loads"),
        "nested_torch_load": (lambda: Reduce(torch.load, str(path.parent / "inner.pth")), "torch.serialization.load"),
    }
    crafted = {  # hand-assembled: things pickle would not write from live objects
        "getattr_chain": (lambda: exec_via_getattr_chain(marker), "getattr(function"),
        "getattr_on_stand_in": (lambda: getattr_(getattr_(G("mmengine.logging.history_buffer", "HistoryBuffer"),
                                                          "min"), "__globals__"), "getattr(StandInMember"),
        "missing_module": (lambda: Call(G("xtuner_evil_plugin.hooks", "run"), "x"), "xtuner_evil_plugin.hooks.run"),
        "builtins_import": (lambda: Call(getattr_(Call(G("__builtin__", "__import__"), "os"), "system"),
                                         f"touch {marker}"), "builtins.__import__"),
        "importlib_loader": (lambda: Call(getattr_(Call(G("importlib.machinery", "SourceFileLoader"), "pwn",
                                                        str(witness.script)), "load_module")),
                             "importlib.machinery.SourceFileLoader"),
    }
    if kind == "zip_torch_file":  # the payload sits inside a normal-looking torch zip, next to real tensors
        torch.save({"state_dict": {"a.lora_A.weight": torch.ones(2, 2)}, "meta": Reduce(os.system, f"touch {marker}")},
                   path)
        return path, "posix.system"
    if kind == "nested_torch_load":  # the outer file loads an inner one that runs the payload
        torch.save(Reduce(os.system, f"touch {marker}"), path.parent / "inner.pth")
    if kind in reduced:
        build, refused = reduced[kind]
        # torch.save's protocol 2 writes Python 2 names (`commands.Popen`); protocol 3 the Python 3 ones, which are
        # what an allowlist entry would match.
        path.write_bytes(pickle.dumps(build(), protocol=3 if kind in PROTOCOL_3 else 2))
    else:
        build, refused = crafted[kind]
        path.write_bytes(assemble(build()))
    return path, refused


DELAY_S = 1  # the delayed payload acts this long after the load returned
PROTOCOL_3 = {"subprocess_popen_delayed", "shutil_rmtree", "urllib_urlopen"}
NOT_LIVE = {"getattr_on_stand_in", "missing_module"}  # refused by name; they would fail even with a full unpickle
PAYLOADS = ["os_system", "subprocess_popen", "subprocess_popen_delayed", "os_posix_spawn", "builtins_eval",
            "builtins_exec", "getattr_chain", "builtins_open", "os_remove", "shutil_rmtree", "socket_connect",
            "urllib_urlopen", "runpy_run_path", "nested_pickle_loads", "nested_torch_load", "builtins_import",
            "importlib_loader", "zip_torch_file", *sorted(NOT_LIVE)]


class Witness:
    """Whatever a payload could act on, set up before it runs: a marker to create, a file and a directory to delete,
    a socket listening on loopback, a script that creates the marker when run. `seen()` says what happened."""

    def __init__(self, root: Path):
        self.marker, self.victim_file, self.victim_dir = root / "pwned", root / "victim.txt", root / "victim"
        self.script = root / "script.py"
        self.script.write_text(touch(self.marker) + "\n")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.reset()

    def reset(self):
        self.marker.unlink(missing_ok=True)
        self.victim_file.write_text("keep")
        self.victim_dir.mkdir(exist_ok=True)
        (self.victim_dir / "keep.txt").write_text("keep")
        while select.select([self.listener], [], [], 0)[0]:  # drop connections made while proving a payload live
            self.listener.accept()[0].close()

    def seen(self) -> list[str]:
        return [what for what, happened in [
            ("the marker was created", self.marker.exists()),
            ("a file was deleted", not self.victim_file.exists()),
            ("a directory was deleted", not (self.victim_dir / "keep.txt").exists()),
            ("the listener was connected to", bool(select.select([self.listener], [], [], 0)[0])),
        ] if happened]


@pytest.fixture
def witness(tmp_path):
    w = Witness(tmp_path)
    yield w
    w.listener.close()


def unsafe_load(path: Path, witness: Witness, monkeypatch) -> float | None:
    """Do what the shared fix does, `torch.load(weights_only=False)`: proves the payload is live (it is ours). Returns
    how many seconds its effect took to show (a child process acts on its own time), None if nothing happened in 5 s."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # so a nested torch.load is unsafe too
    start = time.monotonic()
    try:
        torch.load(path, weights_only=False)
    except Exception:  # the payloads return junk, not checkpoints
        pass
    while time.monotonic() - start < 5:
        if witness.seen():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("kind", PAYLOADS)
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, kind, capsys, monkeypatch, witness):
    src, refused = write_payload(kind, tmp_path / "iter_666.pth", witness)
    took = 0.0
    if kind not in NOT_LIVE:  # not a dud: a plain unsafe load does run it
        took = unsafe_load(src, witness, monkeypatch)
        assert took is not None, f"payload {kind} is not live"
        witness.reset()
        monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        capsys.readouterr()  # torch's warnings from that unsafe load are not convert.py's output
    code, out, err = run([src, tmp_path / "out", "--base", "x"], capsys)
    # Nothing ran: checked after twice the time the payload took to act when it was allowed to, so that an effect
    # that comes after the load returned (a child process, a delayed one) is seen too.
    time.sleep(max(0.1, 2 * took))
    assert witness.seen() == [], kind
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "refused to load" in err and refused in err and "--trust-checkpoint" in err
    assert not (tmp_path / "out").exists()


# Every global the safe loader allows on top of torch's own list, and why unpickling it runs nothing of the file's.
ALLOWED_GLOBALS = {
    "numpy.ndarray": "a class that BUILD fills with shape, dtype and raw bytes; mmengine's log history is arrays",
    "numpy.dtype": "a class that BUILD fills with a byte order and flags; no code is named by it",
    **dict.fromkeys(["numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"],
                    "numpy's own array constructor for pickles (numpy 2 and 1 names): an empty array of a dtype"),
    **dict.fromkeys(["numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar"],
                    "a numpy scalar from a dtype and its raw bytes (numpy 2 and 1 names)"),
    **dict.fromkeys([f"numpy.dtypes.{name}DType" for name in (
        "Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "LongLong", "ULongLong",
        "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128", "CLongDouble")],
        "the class of a plain number dtype, which BUILD on a dtype checks; numbers only, no object dtype"),
    **dict.fromkeys(safeload.STAND_INS, "an inert StandIn of a class not installed here: arguments and state kept "
                                        "as data, no methods"),
    "builtins.getattr": "safeload's restricted getattr: only min/max/current/mean of the HistoryBuffer stand-in, "
                        "which are names (strings), never functions",
}

# torch's own weights-only list, beyond torch's tensor, storage, dtype and rebuild names.
TORCH_ALLOWED_OUTSIDE_TORCH = {
    "_codecs.encode": "str -> bytes: how protocol 2 writes bytes",
    "builtins.bytearray": "a container", "builtins.complex": "a number", "builtins.set": "a container",
    "collections.Counter": "a dict", "collections.OrderedDict": "a dict (state dicts)",
}


def test_the_unpicklers_allowlist_is_pinned(tmp_path):
    """Exactly these globals, each loadable through safeload.load; anything added must be argued for here."""
    allowed = {}
    for entry in safeload._allowlist():
        obj, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
        allowed[name] = obj
    assert set(allowed) == set(ALLOWED_GLOBALS)
    torch_allowed = torch._weights_only_unpickler._get_allowed_globals()
    assert {n for n in torch_allowed if not n.startswith("torch.")} == set(TORCH_ALLOWED_OUTSIDE_TORCH)
    for name, obj in allowed.items():  # the list is the one load() uses: each name resolves to its object
        module, _, attr = name.rpartition(".")
        path = tmp_path / f"{name}.pt"
        path.write_bytes(legacy_torch_file(assemble(G("__builtin__" if module == "builtins" else module, attr))))
        assert safeload.load(path) is obj, name


def legacy_torch_file(payload: bytes) -> bytes:
    """A torch < 1.6 (not zip) file holding the pickle `payload`: magic number, protocol, system info, the object,
    and an empty list of storages."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    sys_info = dict(protocol_version=PROTOCOL_VERSION, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
    head = b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info))
    return head + payload + pickle.dumps([], protocol=2)


def test_refusal_inside_deepspeed_shard(tmp_path, base, lora, capsys):
    src = save_deepspeed_dir(tmp_path / "iter_500.pth", xtuner_state_dict(lora), xtuner_cfg(str(base)), stage=2)
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": {"zero_stage": Reduce(os.system, f"touch {marker}")}},
               src / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    code, out, err = run([src], capsys)
    assert code == 2 and "bf16_zero_pp_rank_1" in err and "posix.system" in err
    assert not marker.exists()


# --- bad paths and bad files: one line, exit 2 ------------------------------------------------------------------------

def test_bad_inputs_give_one_line_errors(tmp_path, base, lora, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    truncated = tmp_path / "truncated.pth"
    torch.save({"a": torch.ones(3)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    no_tensors = tmp_path / "list.pt"
    torch.save([1, 2, 3], no_tensors)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    no_weights = tmp_path / "peft_no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text("{}")
    bad_json = tmp_path / "peft_bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{nope")
    (bad_json / "adapter_model.safetensors").write_bytes(b"")
    cases = {
        tmp_path / "missing.pth": "no such file or directory",
        garbage: "not a readable PyTorch checkpoint",
        truncated: "not a readable PyTorch checkpoint",
        bad_st: "not a readable safetensors file",
        no_tensors: "expected a state dict",
        empty_dir: "not a checkpoint I know",
        no_weights: "has adapter_config.json but no adapter_model.safetensors",
        bad_json: "not valid JSON",
    }
    for src, expected in cases.items():
        code, out, err = run([src, tmp_path / "out", "--base", base], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, (src, err)
    assert not (tmp_path / "out").exists()


def test_verify_failure_leaves_nothing_behind(tmp_path, lora, capsys):
    """--verify runs before the rename: an adapter that does not fit the named base is reported, not written."""
    other = tmp_path / "other_base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    src = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(lora).items()}, src)
    code, out, err = run([src, tmp_path / "out", "--base", other, "--verify"], capsys)
    assert code == 2 and err.endswith("\n") and err.count("error: ") == 1, err
    line = err.splitlines()[-1]
    assert line.startswith("error: --verify: the adapter does not load onto") and "size mismatch" in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_existing_output_needs_force_and_source_is_never_the_output(tmp_path, base, lora, capsys):
    src = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(lora).items()}, src)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    code, out, err = run([src, dst, "--base", base], capsys)
    assert code == 2 and "already exists; pass --force" in err and (dst / "mine.txt").read_text() == "keep me"
    code, out, err = run([src, dst, "--base", base, "--force"], capsys)
    assert code == 0 and not (dst / "mine.txt").exists() and (dst / "adapter_model.safetensors").is_file()
    code, out, err = run([tmp_path, tmp_path, "--force"], capsys)
    assert code == 2 and "would replace the input" in err


def test_cli_refusal_exits_2_without_traceback(tmp_path, witness):
    """The real command line, as a user runs it on a malicious file: exit status 2, one line, nothing run."""
    evil, _ = write_payload("os_system", tmp_path / "iter_500.pth", witness)
    bad = subprocess.run([sys.executable, str(ROOT / "convert.py"), str(evil), "--base", "x"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    assert "`posix.system`" in bad.stderr and witness.seen() == [] and not (tmp_path / "hf").exists()
