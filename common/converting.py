"""Any fine-tuning checkpoint -> a standard PEFT adapter directory (or an HF model directory for full fine-tunes).

Sources (read_source tries each reader's `matches` in turn):
  - a PEFT / HF directory: our own checkpoint-N/ or final/ (adapter_config.json, or config.json + model weights);
  - a DeepSpeed directory: XTuner's iter_N.pth/ (mp_rank_00_model_states.pt + ZeRO *_optim_states.pt shards);
  - a file: XTuner's iter_N.pth (mmengine runner pickle) or a plain state dict (.pt/.bin/.pth/.safetensors).
Every torch file goes through common.safeload: nothing in it runs. Optimizer, scheduler, RNG and training-args
pickles of a Trainer checkpoint are never opened at all.
"""
from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import artifacts, safeload
from common.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from common.cli import UserError, first_line, read_json, reading
from common.xtuner_config import xtuner_config_hints
from common.zero import zero_fp32_weights, zero_stage

DS_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
OUTPUT_NAME = "hf"  # convert.py's default output: SRC's sibling hf/


@dataclass
class Checkpoint:
    kind: str  # for the report, e.g. "XTuner iter_N.pth"
    tensors: dict[str, torch.Tensor]
    base_candidates: list[str] = field(default_factory=list)  # most trusted first
    lora_hints: dict = field(default_factory=dict)  # LoraConfig fields read from a config text or recipe
    peft_dir: Path | None = None  # holds an adapter_config.json to keep as is
    model_config_dir: Path | None = None  # holds config.json (full models)
    tokenizer_dir: Path | None = None
    recipe: Path | None = None

    @property
    def is_adapter(self) -> bool:
        return self.peft_dir is not None or any(_LORA_PART.search(k) for k in self.tensors)


# --- reading sources ---------------------------------------------------------------------------------------------

def read_source(src: Path, trust: bool = False) -> Checkpoint:
    if not src.exists():
        raise UserError(f"{src}: no such file or directory")
    for reader in READERS:
        if reader.matches(src):
            ckpt = reader.read(src, trust)
            ckpt.recipe = ckpt.recipe or artifacts.find_recipe_file(src if src.is_dir() else src.parent)
            _add_recipe_hints(ckpt)
            return ckpt
    raise UserError(
        f"{src}: not a checkpoint I know: expected a directory with {ADAPTER_CONFIG} or config.json + model weights, "
        f"a DeepSpeed directory with {DS_MODEL_STATES[0]}, or a .pth/.pt/.bin/.safetensors file"
    )


class PeftDir:
    """Our checkpoint-N/ or final/ (or any PEFT adapter dir): adapter weights + adapter_config.json."""

    @staticmethod
    def matches(src: Path) -> bool:
        return src.is_dir() and (src / ADAPTER_CONFIG).is_file()

    @staticmethod
    def read(src: Path, trust: bool) -> Checkpoint:
        weights = artifacts.adapter_weights(src)
        if weights is None:
            raise UserError(f"{src}: has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")
        config = read_json(src / ADAPTER_CONFIG)
        return Checkpoint(
            kind="PEFT checkpoint directory",
            tensors=safeload.load_tensors(weights, trust=trust),
            base_candidates=[config.get("base_model_name_or_path") or ""],
            peft_dir=src,
            tokenizer_dir=src if artifacts.has_tokenizer(src) else None,
        )


class HFModelDir:
    """A full fine-tune's checkpoint-N/: config.json + model*.safetensors (sharded or not)."""

    @staticmethod
    def matches(src: Path) -> bool:
        return src.is_dir() and (src / artifacts.MODEL_CONFIG).is_file() and bool(artifacts.model_weight_files(src))

    @staticmethod
    def read(src: Path, trust: bool) -> Checkpoint:
        tensors = {}
        for f in artifacts.model_weight_files(src):
            tensors.update(safeload.load_tensors(f, trust=trust))
        return Checkpoint(kind="HF model directory", tensors=tensors,
                          model_config_dir=src, tokenizer_dir=src if artifacts.has_tokenizer(src) else None)


class DeepSpeedDir:
    """XTuner's iter_N.pth/ under DeepSpeed: model states (+ mmengine meta) and one ZeRO optimizer shard per rank."""

    @staticmethod
    def matches(src: Path) -> bool:
        return src.is_dir() and (any(src.glob("*model_states.pt")) or (src / "latest").is_file())

    @staticmethod
    def read(src: Path, trust: bool) -> Checkpoint:
        if (src / "latest").is_file() and not any(src.glob("*model_states.pt")):  # DeepSpeed's own layout: tag dir
            with reading(src / "latest", "not a DeepSpeed `latest` tag file"):
                src = src / (src / "latest").read_text(encoding="utf-8").strip()
        model_file = next((src / n for n in DS_MODEL_STATES if (src / n).is_file()), None)
        model_file = model_file or next(iter(sorted(src.glob("*model_states.pt"))), None)
        if model_file is None:
            raise UserError(f"{src}: no *model_states.pt in this DeepSpeed directory")
        state = safeload.load(model_file, trust=trust)
        if not isinstance(state, dict):
            raise UserError(f"{model_file}: expected a DeepSpeed model-states dict, found {type(state).__name__}")
        optim_files = sorted(src.glob("*_optim_states.pt"), key=_natural_key)
        if optim_files:
            shards = [safeload.load(f, trust=trust) for f in optim_files]
            tensors = zero_fp32_weights(state, shards, src)
            kind = f"XTuner DeepSpeed ZeRO-{zero_stage(shards[0], optim_files[0])} directory ({len(shards)} ranks)"
        else:  # saved without optimizer: fine for ZeRO-1/2, where `module` holds the full weights
            tensors = {k: v for k, v in (safeload.state_dict_in(state) or {}).items() if v.numel() > 0}
            if not tensors:
                raise UserError(f"{src}: the weights are partitioned across ZeRO-3 *_optim_states.pt files, "
                                "and there are none here")
            kind = "XTuner DeepSpeed directory (model states only)"
        ckpt = Checkpoint(kind=kind, tensors=tensors)
        _add_mmengine_meta(ckpt, state)
        return ckpt


class TorchFile:
    """A single file: XTuner's iter_N.pth (mmengine runner pickle) or a plain state dict."""

    @staticmethod
    def matches(src: Path) -> bool:
        return src.is_file()

    @staticmethod
    def read(src: Path, trust: bool) -> Checkpoint:
        if src.suffix == ".safetensors":
            return Checkpoint(kind="safetensors state dict", tensors=safeload.load_tensors(src))
        obj = safeload.load(src, trust=trust)
        tensors = safeload.state_dict_in(obj)
        if tensors is None:
            raise UserError(f"{src}: expected a state dict (name -> tensor) or an XTuner checkpoint with "
                            f"`state_dict`, found {type(obj).__name__}")
        is_xtuner = isinstance(obj, dict) and "meta" in obj and "state_dict" in obj
        ckpt = Checkpoint(kind="XTuner iter_N.pth" if is_xtuner else "state dict file", tensors=tensors)
        _add_mmengine_meta(ckpt, obj)
        return ckpt


READERS = (PeftDir, HFModelDir, DeepSpeedDir, TorchFile)


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


# --- hints: base model and LoRA hyper-parameters from mmengine meta, XTuner config text, or our recipe ----------

RECIPE_LORA_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "use_dora": "use_dora",
                    "use_rslora": "use_rslora", "bias": "bias"}


def _add_mmengine_meta(ckpt: Checkpoint, obj) -> None:
    meta = obj.get("meta") if isinstance(obj, dict) else None
    cfg = meta.get("cfg") if isinstance(meta, dict) else None
    if isinstance(cfg, str):
        base, lora = xtuner_config_hints(cfg)
        ckpt.base_candidates.append(base or "")
        ckpt.lora_hints = {**lora, **ckpt.lora_hints}


def _add_recipe_hints(ckpt: Checkpoint) -> None:
    if ckpt.recipe is None:
        return
    try:
        recipe = artifacts.run_recipe(ckpt.recipe.parent)
    except UserError as e:  # the recipe is a hint here; train.py is where a broken one is an error
        print(f"note: {ckpt.recipe} not used: {e}", file=sys.stderr)
        return
    if recipe.model.path:
        ckpt.base_candidates.append(recipe.model.path)
    if recipe.lora is not None:
        from_recipe = {RECIPE_LORA_KEYS[k]: getattr(recipe.lora, k) for k in RECIPE_LORA_KEYS}
        ckpt.lora_hints = {**from_recipe, **ckpt.lora_hints}  # the checkpoint's own config text wins


def choose_base(explicit: str | None, ckpt: Checkpoint) -> str | None:
    """--base, else the first candidate that exists here, else the first named one (may be a hub id)."""
    if explicit:
        return explicit
    named = [c for c in ckpt.base_candidates if c]
    local = [c for c in named if Path(c).expanduser().is_dir()]
    return (local or named or [None])[0]


def is_local(base: str | None) -> bool:
    return bool(base) and Path(base).expanduser().is_dir()


# --- building the adapter ----------------------------------------------------------------------------------------

_LORA_PART = re.compile(r"(^|\.)lora_[A-Za-z_]+(\.|$)")
_SAVED_PREFIX = "base_model.model."


def peft_key(key: str) -> str | None:
    """A training-time parameter name -> PEFT's saved name, or None if it is not an adapter weight.

    llm.base_model.model.X.q_proj.lora_A.default.weight -> base_model.model.X.q_proj.lora_A.weight
    ...lm_head.modules_to_save.default.weight -> base_model.model.lm_head.weight   (original_module: dropped)
    """
    if _SAVED_PREFIX in key:
        key = key[key.index(_SAVED_PREFIX):]
    else:
        key = _SAVED_PREFIX + re.sub(r"^(llm\.|module\.)+", "", key)
    if ".modules_to_save." in key:
        return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
    if not _LORA_PART.search(key):
        return None
    key = re.sub(r"\.(lora_[A-Za-z_]+)\.(?!weight$|bias$)[^.]+", r".\1", key)  # drop the adapter name
    return re.sub(r"\.lora_magnitude_vector\.weight$", ".lora_magnitude_vector", key)


def adapter_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(PEFT-named adapter tensors, modules_to_save names)."""
    out, to_save = {}, set()
    for key, tensor in tensors.items():
        new = peft_key(key)
        if new is None:
            continue
        if ".modules_to_save." in key:
            to_save.add(new[len(_SAVED_PREFIX):].rsplit(".", 2)[-2])
        # clone: DeepSpeed views share one flat buffer, which safetensors refuses to write
        out[new] = tensor.detach().to("cpu").contiguous().clone()
    return out, sorted(to_save)


def lora_config_from_tensors(sd: dict[str, torch.Tensor], modules_to_save: list[str], hints: dict, base: str,
                alpha: float | None, notes: list[str]):
    """LoraConfig for these tensors: rank and target modules from the shapes, the rest from hints."""
    from peft import LoraConfig

    ranks = {k.rsplit(".lora_", 1)[0][len(_SAVED_PREFIX):]: v.shape[0] for k, v in sd.items()
             if re.search(r"\.lora_(A|embedding_A)(\.weight)?$", k)}
    if not ranks:
        raise UserError("no LoRA tensors (lora_A / lora_B) found in the checkpoint")
    r = Counter(ranks.values()).most_common(1)[0][0]
    target_modules = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    if hints.get("r") not in (None, r):
        notes.append(f"config says r={hints['r']} but the tensors have r={r}; using the tensors")
    if isinstance(hints.get("target_modules"), list) and sorted(hints["target_modules"]) != target_modules:
        notes.append(f"config says target_modules={hints['target_modules']} but the tensors have {target_modules}; "
                     "using the tensors")
    if alpha is None:
        alpha = hints.get("lora_alpha")
    if isinstance(alpha, float) and alpha.is_integer():
        alpha = int(alpha)
    if alpha is None:
        alpha = r
        notes.append(f"lora_alpha is not recorded in the checkpoint: assuming alpha = r = {r} (scale 1.0); "
                     "pass --alpha if training used another value")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(hints.get("lora_dropout") or 0.0),
        target_modules=target_modules,
        rank_pattern={m: rk for m, rk in ranks.items() if rk != r},
        modules_to_save=modules_to_save or None,
        use_dora=any(k.endswith(".lora_magnitude_vector") for k in sd),
        use_rslora=bool(hints.get("use_rslora", False)),
        lora_bias=any(".lora_B." in k and k.endswith(".bias") for k in sd),
        bias=hints.get("bias") or "none",
        base_model_name_or_path=base,
        task_type="CAUSAL_LM",
        inference_mode=True,
    )


def write_adapter(out: Path, ckpt: Checkpoint, base: str, alpha: float | None, notes: list[str]):
    """adapter_model.safetensors + adapter_config.json into `out`; returns (config, number of tensors)."""
    from peft import PeftConfig
    from safetensors.torch import save_file

    if ckpt.peft_dir is not None:  # already PEFT-named; keep every field of its config, re-point the base
        sd = {k: v.contiguous() for k, v in ckpt.tensors.items()}
        with reading(ckpt.peft_dir / ADAPTER_CONFIG, "not a PEFT adapter config"):
            config = PeftConfig.from_pretrained(str(ckpt.peft_dir))
        config.base_model_name_or_path = base
    else:
        sd, to_save = adapter_tensors(ckpt.tensors)
        config = lora_config_from_tensors(sd, to_save, ckpt.lora_hints, base, alpha, notes)
    save_file(sd, str(out / ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    return config, len(sd)


def write_full_model(out: Path, ckpt: Checkpoint, base: str | None) -> int:
    """A full fine-tune -> an HF model directory, built on the base's (or the source's) config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # keep the report to its lines
    config_dir = ckpt.model_config_dir or (Path(base) if is_local(base) else None)
    if config_dir is None:
        raise UserError("these are full-model weights (no LoRA tensors): pass --base DIR of the base model, "
                        "whose config.json describes them")
    sd = {re.sub(r"^(llm\.|module\.)+", "", k): v for k, v in ckpt.tensors.items()}
    with reading(config_dir / artifacts.MODEL_CONFIG, "cannot build the model"), torch.device("meta"):
        # meta: no memory for weights that load_state_dict(assign=True) replaces anyway
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    result = model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or result.unexpected_keys:
        raise UserError(f"the weights do not fit {config_dir / artifacts.MODEL_CONFIG}: missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]}")
    model.save_pretrained(str(out))
    return len(sd)


def copy_tokenizer(out: Path, ckpt: Checkpoint, base: str | None, notes: list[str]) -> str | None:
    """The checkpoint's own tokenizer (it carries the chat template of the run), else the local base's."""
    from common.modeling import load_tokenizer

    source = ckpt.tokenizer_dir or (Path(base).expanduser() if is_local(base) else None)
    if source is None:
        where = f"base `{base}` is not a local directory" if base else "no base model is known"
        notes.append(f"tokenizer not copied: none in the checkpoint and {where} (pass --base DIR)")
        return None
    try:
        tokenizer = load_tokenizer(source)
    except UserError as e:  # the adapter is what was asked for; a tokenizer is a convenience
        notes.append(f"tokenizer not copied: {e}")
        return None
    tokenizer.save_pretrained(str(out))
    return str(source)


def copy_recipe(out: Path, ckpt: Checkpoint) -> None:
    if ckpt.recipe is not None:
        shutil.copy2(ckpt.recipe, out / artifacts.RECIPE_FILE)


# --- output ------------------------------------------------------------------------------------------------------

def default_output(src: Path) -> Path:
    return src.resolve().parent / OUTPUT_NAME


def verify(out: Path, base: str | None, is_adapter: bool) -> str:
    """Load the result with transformers/PEFT and run one forward pass; returns a one-line report."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # keep the report to its lines
    if is_adapter and not is_local(base):
        raise UserError(f"--verify needs the base model on disk; `{base}` is not a local directory (pass --base DIR)")
    if not is_adapter:
        logits = _logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32))
        if not torch.isfinite(logits).all():
            raise UserError("--verify: the converted model gives non-finite logits")
        return "verify: the model loads with transformers; logits finite"
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    with reading(base, "--verify: cannot load the base model"):
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    try:
        model = PeftModel.from_pretrained(base_model, str(out))
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # e.g. shapes that do not fit this base
        raise UserError(f"--verify: the adapter does not load onto {base}: {first_line(e)}") from None
    saved, loaded = load_file(str(out / ADAPTER_WEIGHTS[0])), get_peft_model_state_dict(model)
    bad = [k for k, v in saved.items() if k not in loaded or not torch.equal(loaded[k].to(v.dtype), v)]
    if bad:
        raise UserError(f"--verify: {len(bad)} of {len(saved)} tensors did not load onto {base}, e.g. {bad[0]}")
    logits = _logits(model)
    with model.disable_adapter():
        delta = (logits - _logits(model)).abs().max().item()
    if not torch.isfinite(logits).all():
        raise UserError(f"--verify: the adapter on {base} gives non-finite logits")
    return (f"verify: all {len(saved)} tensors loaded onto {base} with PEFT; logits finite; "
            f"max |adapter - base| logit difference {delta:.3g}")


def _logits(model) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    ids = torch.arange(min(16, vocab)).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def warn(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
