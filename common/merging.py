"""Streaming merge of a PEFT LoRA adapter into its base checkpoint, and its proof.

Memory stays near one output shard plus the adapter: base tensors are read one at a time from memory-mapped files,
merged in float32 exactly as PEFT merges them (peft/tuners/lora/layer.py get_delta_weight, variants.py for DoRA),
cast, and written shard by shard. Nothing here holds the whole model, except `verify`, which loads it on purpose.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int  # the parser split_* uses; not re-exported
from safetensors.torch import save_file

from common import artifacts, safeload
from common.cli import UserError, read_json, reading
from common.weights import ModelWeights

PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model in adapter tensor names
# Adapter tensor name suffix -> its part in the merge. lora_embedding_* are the Embedding layer's A and B.
LORA_PARTS = {
    "lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias",
    "lora_embedding_A": "A", "lora_embedding_B": "B", "lora_magnitude_vector": "magnitude",
}
# LoRA features whose merge is not `W + scaling * B @ A` on a stored weight: refused rather than merged wrongly.
UNSUPPORTED = {
    "layer_replication": "layers are duplicated at load time, so the merged model has more layers than the base",
    "target_parameters": "LoRA on bare nn.Parameters (e.g. fused MoE experts)",
    "trainable_token_indices": "trainable-token deltas",
    "use_qalora": "QA-LoRA pools inputs before A",
}
VERIFY_PROMPTS = ["Hello! Who are you?", "Write a haiku about the sea.", "What is 17 times 23? Explain briefly."]
VERIFY_TOLERANCE = 1e-4  # max |logit difference| allowed between the fp32 merge and PEFT's unmerged adapter model
# Logits are computed in float64: in float32, x @ (W + dW) and x @ W + (x @ A) @ B * s round differently, and over
# SmolLM2's 30 layers that alone reaches ~1e-4. In float64 the figure measures the merged fp32 weights, not the sums.
VERIFY_DTYPE = torch.float64
MAX_PROBLEMS = 20


def parse_size(text: str) -> int:
    """`2GB`, `500MB` (decimal units, as huggingface_hub counts them) or a number of bytes."""
    try:
        size = int(text) if text.strip().isdigit() else parse_size_to_int(text)
    except ValueError:
        raise UserError(f"--max-shard-size: got {text!r}, expected e.g. 2GB, 500MB or a number of bytes") from None
    if size <= 0:
        raise UserError(f"--max-shard-size: got {text!r}, expected a positive size")
    return size


def _problems(header: str, problems: list[str]) -> UserError:
    shown = problems[:MAX_PROBLEMS] + ([f"... and {len(problems) - MAX_PROBLEMS} more"] if len(problems) > MAX_PROBLEMS else [])
    return UserError(f"{header}: {len(problems)} problem{'s' * (len(problems) > 1)}:\n  - " + "\n  - ".join(shown))


# ---------------------------------------------------------------------------------------------------------- adapter
@dataclass
class Lora:
    """One adapted layer, in the (out, in) layout of nn.Linear; `transposed` when stored as (in, out)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    transposed: bool  # nn.Embedding (always) and fan_in_fan_out layers (GPT-2's Conv1D)
    magnitude: torch.Tensor | None = None  # DoRA
    bias: torch.Tensor | None = None  # lora_bias=True

    def merge(self, weight: torch.Tensor, device: str) -> torch.Tensor:
        """W + scaling * B @ A in float32, with DoRA's rescaling: the same operations, in the same order, as PEFT."""
        w = weight.to(device=device, dtype=torch.float32)
        w = w.T if self.transposed else w
        delta = (self.B.to(device, torch.float32) @ self.A.to(device, torch.float32)) * self.scaling
        merged = w + delta
        if self.magnitude is not None:
            # DoRA: each output row of W + dW is rescaled to length m; the norm runs over the input axis (dim=1
            # in the (out, in) layout), as DoraLinearLayer.get_weight_norm computes it
            norm = torch.linalg.norm(merged, dim=1)
            merged = (self.magnitude.to(device, torch.float32) / norm).view(-1, 1) * merged
        if not torch.isfinite(merged.sum()):  # as PEFT's safe_merge checks; NaN/inf in any entry make the sum so
            raise UserError("the merged weight has NaN or inf values: the adapter is broken")
        return (merged.T if self.transposed else merged).contiguous().cpu()

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias.float() + self.bias.float() * self.scaling


@dataclass
class Adapter:
    path: Path
    config: dict
    loras: dict[str, Lora]  # by module name, e.g. model.layers.0.self_attn.q_proj
    tensors: dict[str, torch.Tensor]  # whole tensors that replace the base's: modules_to_save, trained biases, copies


def _config_problems(config: dict) -> list[str]:
    """The adapter_config.json fields the merge reads, checked for type (a hand-edited or damaged config)."""
    def number(v, whole=False):
        return not isinstance(v, bool) and isinstance(v, int if whole else (int, float)) and v > 0

    problems = [f"`{key}`: expected {what}, found {json.dumps(config.get(key))}" for key, check, what in (
        ("r", lambda v: number(v, whole=True), "a positive integer"),
        ("lora_alpha", number, "a positive number"),
        ("rank_pattern", lambda v: v is None or isinstance(v, dict) and all(number(x, True) for x in v.values()),
         "an object of module pattern -> rank"),
        ("alpha_pattern", lambda v: v is None or isinstance(v, dict) and all(number(x) for x in v.values()),
         "an object of module pattern -> alpha"),
        ("use_rslora", lambda v: v is None or isinstance(v, bool), "true or false"),
        ("fan_in_fan_out", lambda v: v is None or isinstance(v, bool), "true or false"),
    ) if not check(config.get(key))]
    return problems


def per_module(patterns: dict, module: str, default):
    """A module's value from an adapter's rank_pattern or alpha_pattern, by the rule PEFT applies when it builds the
    layer (LoraModel._create_and_replace). peft itself (~5 s to import on 2 cores) is imported only where the adapter
    has patterns: merge.py's help, its refusals and a plain merge go without it."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(patterns.keys(), module), default)


def load_adapter(path: Path) -> Adapter:
    config = read_json(path / artifacts.ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path / artifacts.ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r}; only LoRA adapters (LORA) can be merged")
    problems = _config_problems(config)
    if problems:  # a few fields at most: one line
        raise UserError(f"{path / artifacts.ADAPTER_CONFIG}: " + "; ".join(problems))
    problems = [f"`{key}` is set: {why}; not supported by this merge" for key, why in UNSUPPORTED.items() if config.get(key)]
    weights = artifacts.adapter_weights(path)
    if weights is None:
        raise UserError(f"{path}: no adapter weights (expected {' or '.join(artifacts.ADAPTER_WEIGHTS)})")
    state = safeload.load_tensors(weights)

    parts: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(PEFT_PREFIX):
            problems.append(f"{key}: not a PEFT tensor name (expected it to start with `{PEFT_PREFIX}`)")
            continue
        name = key[len(PEFT_PREFIX):]
        suffix = next((s for s in LORA_PARTS if name.endswith("." + s)), None)
        if suffix:
            module = parts.setdefault(name[: -len(suffix) - 1], {})
            module[LORA_PARTS[suffix]] = tensor
            module["embedding"] = module.get("embedding", False) or suffix.startswith("lora_embedding")
        elif ".lora_" in name:
            problems.append(f"{key}: unsupported LoRA tensor")
        else:  # `X.base_layer.weight` is PEFT's saved copy of the base `X.weight` (embeddings); the rest is saved as named
            tensors[name.replace(".base_layer.", ".")] = tensor

    loras = {}
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            problems.append(f"{module}: has {sorted(k for k in p if k != 'embedding')} but not both LoRA A and B")
            continue
        if p["A"].ndim != 2:
            problems.append(f"{module}: LoRA on a {p['A'].ndim}-d weight (convolution) is not supported")
            continue
        r = per_module(rank_pattern, module, config["r"])
        alpha = per_module(alpha_pattern, module, config["lora_alpha"])
        if not (p["A"].shape[0] == p["B"].shape[1] == r):
            problems.append(f"{module}: A {list(p['A'].shape)} and B {list(p['B'].shape)} do not have rank r={r} from the config")
            continue
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        transposed = p["embedding"] or bool(config.get("fan_in_fan_out"))
        loras[module] = Lora(p["A"], p["B"], scaling, transposed, p.get("magnitude"), p.get("bias"))
    if problems:
        raise _problems(f"adapter {path}", problems)
    return Adapter(path, config, loras, tensors)


# ------------------------------------------------------------------------------------------------------------- plan
def tied_weights(base_dir: Path) -> dict[str, str]:
    """Tied parameters (target -> source, e.g. lm_head.weight -> model.embed_tokens.weight), asked of transformers.

    The model is built on the meta device, so this costs no memory, and every architecture answers for itself.
    """
    from transformers import AutoModelForCausalLM

    config = artifacts.model_config(base_dir)  # a config transformers knows but cannot parse: an error naming it
    if config is None:  # remote-code architecture (Qwen1, ChatGLM...): merge what the checkpoint holds, untied logic off
        print(f"note: transformers has no built-in architecture for {base_dir / artifacts.MODEL_CONFIG}; assuming no tied weights")
        return {}
    with reading(base_dir / artifacts.MODEL_CONFIG, f"cannot build a `{config.model_type}` model from it"), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return dict(model.get_expanded_tied_weights_keys(all_submodels=True))


@dataclass
class MergePlan:
    base: ModelWeights
    adapter: Adapter
    sources: dict[str, str]  # output tensor -> base tensor it is computed from, in output order
    dtype: torch.dtype | None  # None: each tensor keeps the base's dtype
    device: str
    untied: dict[str, str] = field(default_factory=dict)  # tied target -> source, both written (tie_word_embeddings false)
    skipped_tied: list[str] = field(default_factory=list)  # tied targets left out: transformers re-ties them on load

    def out_dtype(self, key: str, dtype: torch.dtype | None = None) -> torch.dtype:
        base_dtype = self.base.dtype[self.sources[key]]
        dtype = dtype or self.dtype
        return dtype if dtype is not None and base_dtype.is_floating_point else base_dtype

    @property
    def float_dtypes(self) -> set[str]:
        """The floating-point dtypes written, e.g. {"bfloat16"}."""
        dtypes = {self.out_dtype(k) for k, src in self.sources.items() if self.base.dtype[src].is_floating_point}
        return {str(d).removeprefix("torch.") for d in dtypes}

    def config_updates(self) -> dict:
        updates = {"tie_word_embeddings": False} if self.untied else {}
        if self.dtype is not None:
            updates["dtype"] = str(self.dtype).removeprefix("torch.")
        return updates

    def meta(self) -> dict[str, torch.Tensor]:
        """Shape-and-dtype stand-ins of the output, so huggingface_hub can plan the shards before anything is read."""
        return {k: torch.empty(self.base.shape[src], dtype=self.out_dtype(k), device="meta") for k, src in self.sources.items()}

    def tensors(self, keys, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        with self.base.reader() as read:
            for key in keys:
                yield key, self._merged(key, read, dtype)

    def _merged(self, key: str, read, dtype: torch.dtype | None) -> torch.Tensor:
        tensor = self.adapter.tensors.get(key)
        if tensor is None:
            tensor = read(self.sources[key])
        module, _, param = key.rpartition(".")
        lora = self.adapter.loras.get(module)
        if lora is not None and param == "weight":
            try:
                tensor = lora.merge(tensor, self.device)
            except UserError as e:
                raise UserError(f"{module}: {e}") from None
        elif lora is not None and param == "bias" and lora.bias is not None:
            tensor = lora.merge_bias(tensor)
        return tensor.to(self.out_dtype(key, dtype)).contiguous()


def plan_merge(base: ModelWeights, adapter: Adapter, tied: dict[str, str], dtype, device: str) -> MergePlan:
    """Decide what each output tensor is made of, and check that adapter and base match, listing every mismatch."""
    problems = []

    def modified(key: str, read) -> bool:
        replacement = adapter.tensors.get(key)
        differs = replacement is not None and not torch.equal(replacement, read(key if key in base.shape else tied[key]))
        return key.rpartition(".")[0] in adapter.loras or differs

    with base.reader() as read:
        tied = {t: s for t, s in tied.items() if s in base.shape}
        # A tied pair the adapter touches is no longer tied in the adapter model (PEFT wraps the two modules apart),
        # so writing it tied would change the model: untie it. Untouched pairs stay tied, written once.
        untied = {t: s for t, s in tied.items() if modified(t, read) or modified(s, read)}
    sources = {}
    for key in base.shape:
        if key in tied and key not in untied:
            continue
        sources[key] = key
        sources.update({t: key for t, s in untied.items() if s == key and t not in base.shape})

    for module, lora in adapter.loras.items():
        key = module + ".weight"
        if key not in sources:
            problems.append(f"{module}: targeted by the adapter, but the base has no `{key}`")
            continue
        shape = base.shape[sources[key]]
        out, inp = (shape[1], shape[0]) if lora.transposed and len(shape) == 2 else (shape[0], shape[-1])
        if len(shape) != 2 or lora.B.shape[0] != out or lora.A.shape[1] != inp:
            problems.append(f"{module}: base weight {list(shape)} does not fit LoRA A {list(lora.A.shape)} / B {list(lora.B.shape)}")
        if lora.magnitude is not None and tuple(lora.magnitude.shape) != (out,):
            problems.append(f"{module}: DoRA magnitude {list(lora.magnitude.shape)} does not fit base weight {list(shape)}")
        if lora.bias is not None and module + ".bias" not in sources:
            problems.append(f"{module}: the adapter trains a LoRA bias (lora_bias), but the base layer has no bias")
    for key, tensor in adapter.tensors.items():
        if key not in sources and key not in tied:
            problems.append(f"{key}: saved in the adapter, but the base has no such tensor")
        elif key in sources and tuple(tensor.shape) != base.shape[sources[key]]:
            problems.append(f"{key}: adapter has {list(tensor.shape)}, base has {list(base.shape[sources[key]])} (resized vocabulary?)")
    if problems:
        raise _problems(f"adapter {adapter.path} does not match base {base.path}", problems)
    skipped = [t for t in tied if t not in untied]
    return MergePlan(base, adapter, sources, dtype, device, untied, skipped)


# ------------------------------------------------------------------------------------------------------------ write
def write_shards(plan: MergePlan, out_dir: Path, max_shard_size: int) -> list[tuple[str, int]]:
    """Write the merged weights; one shard in memory at a time. Returns (file name, bytes of tensor data)."""
    split = split_torch_state_dict_into_shards(plan.meta(), max_shard_size=max_shard_size)
    written = []
    for filename, keys in split.filename_to_tensors.items():
        shard = dict(plan.tensors(keys))  # merged tensors, and memory-mapped base ones passed through untouched
        save_file(shard, out_dir / filename, metadata={"format": "pt"})
        written.append((filename, sum(t.numel() * t.element_size() for t in shard.values())))
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / artifacts.MODEL_WEIGHTS[0][0]).write_text(json.dumps(index, indent=2) + "\n")
    return written


def write_side_files(plan: MergePlan, out_dir: Path) -> str:
    """config.json and generation_config.json from the base; the tokenizer (with its chat template) from the adapter
    directory when it has one (our final/ does: the template used in training), else from the base. Returns a note."""
    from common.modeling import load_tokenizer

    base_dir, adapter_dir = plan.base.path, plan.adapter.path
    config = read_json(base_dir / artifacts.MODEL_CONFIG)
    config.update(plan.config_updates())
    if "torch_dtype" in config and "dtype" in plan.config_updates():  # configs written by transformers 4
        config["torch_dtype"] = config["dtype"]
    (out_dir / artifacts.MODEL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if (base_dir / artifacts.GENERATION_CONFIG).is_file():
        shutil.copy2(base_dir / artifacts.GENERATION_CONFIG, out_dir / artifacts.GENERATION_CONFIG)
    source = next((d for d in (adapter_dir, base_dir) if artifacts.has_tokenizer(d)), None)
    if source is None:
        return "no tokenizer in the adapter or base directory: the merged model has none"
    tokenizer = load_tokenizer(source)
    tokenizer.save_pretrained(out_dir)
    template = "with its chat template" if tokenizer.chat_template else "WITHOUT a chat template"
    return f"tokenizer from {source} ({template})"


# ----------------------------------------------------------------------------------------------------------- verify
@torch.no_grad()
def _logits(model, batches) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits.double().cpu() for ids in batches]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def verify(plan: MergePlan, out_dir: Path, device: str) -> dict:
    """Prove the merge: merged logits vs PEFT's unmerged base + adapter on a few prompts, evaluated in float64.

    When the output is fp16/bf16 the written model also carries that rounding, so the proof is made with the same
    merge computed in fp32 and loaded into the merged model; the written model's difference is reported too.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.modeling import load_tokenizer

    tokenizer = load_tokenizer(out_dir)
    batches = []
    for prompt in VERIFY_PROMPTS:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        batches.append(torch.tensor([ids]))

    base = AutoModelForCausalLM.from_pretrained(plan.base.path, dtype=VERIFY_DTYPE)
    reference = PeftModel.from_pretrained(base, plan.adapter.path).to(device, VERIFY_DTYPE).eval()  # LoRA too
    ref = _logits(reference, batches)
    with reference.disable_adapter():
        base_logits = _logits(reference, batches)
    del reference, base

    merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=VERIFY_DTYPE).to(device).eval()
    written = _logits(merged, batches)
    all_fp32 = plan.float_dtypes <= {"float32"}
    result = {"prompts": len(batches), "written_dtype": None if all_fp32 else "/".join(sorted(plan.float_dtypes)),
              "max_abs_diff_written": _max_diff(written, ref)}
    if all_fp32:
        fp32 = written
    else:
        state = dict(plan.tensors(plan.sources, dtype=torch.float32))
        # tied targets are absent from `state`: they share their source's storage and follow it
        unexpected = merged.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise UserError(f"verify: checkpoint names {unexpected[:3]} are not parameter names of the loaded model")
        fp32 = _logits(merged, batches)
    result["max_abs_diff"] = _max_diff(fp32, ref)
    result["max_abs_diff_vs_base"] = _max_diff(fp32, base_logits)
    result["tolerance"] = VERIFY_TOLERANCE
    result["ok"] = result["max_abs_diff"] <= VERIFY_TOLERANCE < result["max_abs_diff_vs_base"]
    return result
