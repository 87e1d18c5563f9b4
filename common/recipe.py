"""YAML recipe -> dataclasses. The dataclass defaults are the schema; every problem is reported at once."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from common import precision
from common.cli import UserError, did_you_mean, read_json, reading
from common.samples import TRUNCATION_MODES
from common.templates import THINKING_MODES


FAST_PATHS = ("packed_attention", "fused_lora", "labelled_loss", "chunked_loss", "packed_pairs")  # common/acceleration.py
FSDP_MODES = ("full_shard", "shard_grad_op")  # train.fsdp (common/training.py fsdp_arguments)
# DPO losses of TRL's DPOTrainer that need no setting beyond beta (and label_smoothing for robust and exo_pair)
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down", "sigmoid_norm", "discopop")


@dataclass
class ModelConfig:
    path: str = ""  # local directory (or hub id on a machine with network)
    tokenizer: Optional[str] = None  # default: model.path
    dtype: Literal[precision.CHOICES] = "auto"  # auto: by the hardware
    quantization: Optional[Literal["4bit", "8bit"]] = None  # 4bit = NF4 + double quant (QLoRA)
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None  # e.g. sdpa, eager, flash_attention_2
    adapter: Optional[str] = None  # a trained PEFT adapter of model.path to continue (its own LoRA settings apply)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


@dataclass
class DataSource:
    """One entry of a mixture in data.path / data.eval_path: a file, its weight, and its own reading and template
    rules (unset: the data section's)."""
    path: str = ""
    weight: Optional[float] = None  # shares of conversations, drawn with train.seed (common/dataset.py _mix)
    format: Optional[str] = None
    template: Optional[str] = None
    system: Optional[str] = None
    truncation: Optional[Literal[TRUNCATION_MODES]] = None


def _sources(value) -> list[DataSource]:
    entries = [] if value is None else [value] if isinstance(value, str) else value
    return [DataSource(path=e) if isinstance(e, str) else e if isinstance(e, DataSource) else DataSource(**e)
            for e in entries]


@dataclass
class DataConfig:
    # a file, a list of files, or a list of sources ({path, weight, format, template, system, truncation}) mixed to
    # their weights
    path: Union[str, list[Union[str, dict]]] = field(default_factory=list)
    format: str = "auto"  # auto (per file) or a format the method reads (docs/methods.md), e.g. sft: xtuner | openai
    template: str = "tokenizer"  # an XTuner name, a family's (qwen3, qwen3_nothink, llama3, gemma3...), or `tokenizer`
    thinking: Literal[THINKING_MODES] = "keep"  # reasoning (<think>, reasoning_content): keep | drop | nothink
    system: Optional[str] = None  # default system prompt for records without one
    max_length: int = 2048
    truncation: Literal[TRUNCATION_MODES] = "split"  # cut | turns | split: common/samples.py
    pack: bool = True
    shuffle_before_pack: bool = True
    on_bad_record: Literal["error", "skip"] = "error"
    eval_path: Optional[Union[str, list[Union[str, dict]]]] = None
    eval_fraction: float = 0.0
    num_proc: Optional[int] = None  # processes that encode the data; null: the cores (small data sets use one)

    @property
    def sources(self) -> list[DataSource]:
        return _sources(self.path)

    @property
    def eval_sources(self) -> list[DataSource]:
        return _sources(self.eval_path)

    @property
    def mixed(self) -> bool:
        """Whether data.path's sources are mixed to weights (otherwise every conversation of every file is used)."""
        return any(s.weight is not None for s in self.sources)

    @property
    def eval_mixed(self) -> bool:
        return any(s.weight is not None for s in self.eval_sources)

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.sources]

    @property
    def eval_paths(self) -> list[str]:
        return [s.path for s in self.eval_sources]


@dataclass
class TrainConfig:
    output_dir: Optional[str] = None  # default: work_dirs/<recipe file stem>
    batch_size: int = 1
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"  # any transformers SchedulerType name
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    logging_steps: int = 10
    seed: int = 42
    gradient_checkpointing: bool = False
    deepspeed: Optional[str] = None  # a DEEPSPEED_PRESETS name (zero2 | zero3) or a DeepSpeed JSON file
    # FSDP2 through the Trainer (accelerate), each decoder layer a shard unit: full_shard frees a layer's gathered
    # weights after its forward (least memory), shard_grad_op keeps them until its backward (less communication)
    fsdp: Optional[Literal[FSDP_MODES]] = None
    # common/acceleration.py's faster paths, each computing the same loss: true (all), false (TRL's own loss and
    # attention, PEFT's LoRA forward) or a list of: packed_attention, fused_lora, labelled_loss, chunked_loss,
    # packed_pairs (DPO: a batch's pairs in one row, each prompt once)
    fast_paths: Union[bool, list[Literal[FAST_PATHS]]] = True
    # trackers: tensorboard (in OUTPUT_DIR/runs), wandb, mlflow, swanlab, trackio, a list of them, or none
    report_to: Union[str, list[str]] = "tensorboard"
    report_answers: bool = False  # also send the evaluation prompts' answers to the trackers (counselling text)
    method: str = "sft"  # a method of common/methods/ (docs/methods.md): sft, dpo, orpo, kto, grpo


@dataclass
class PreferenceConfig:
    """train.method dpo | orpo (TRL's DPOTrainer, trl.experimental.orpo.ORPOTrainer)."""
    beta: float = 0.1  # DPO: how far the policy may move from the reference (higher = closer)
    loss_type: Literal[DPO_LOSSES] = "sigmoid"  # DPO's loss (TRL's loss_type)
    label_smoothing: float = 0.0  # DPO robust / exo_pair: the assumed share of flipped labels
    orpo_lambda: float = 0.1  # ORPO: weight of the odds-ratio term beside the NLL of the chosen answer (TRL's beta)


GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")  # TRL's GRPO loss_type values that need no more


@dataclass
class GrpoConfig:
    """train.method grpo (TRL's GRPOTrainer); the keys are GRPOConfig's. train.batch_size counts completions: each
    step samples batch_size x grad_accum / num_generations prompts, num_generations completions each."""
    num_generations: int = 4  # the group: completions per prompt, whose rewards are compared with each other
    max_completion_length: int = 256  # new tokens per completion (a longer one is cut: `ending` scores it 0)
    temperature: float = 1.0  # sampling of the completions; a group learns only where its completions differ
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    beta: float = 0.0  # KL weight against the model before training (0: no reference forward, TRL's default)
    loss_type: Literal[GRPO_LOSSES] = "dapo"
    epsilon: float = 0.2  # clipping of the policy ratio
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = 1  # optimisation passes over each batch of completions
    mask_truncated_completions: bool = False  # leave completions cut at max_completion_length out of the loss
    fast_rollouts: bool = True  # completions by common/decoding.py's batched decoder (the same sampling), else TRL's generate()


@dataclass
class KtoConfig:
    """train.method kto (TRL's KTOTrainer) on answers rated good or bad; the keys as TRL names them."""
    beta: float = 0.1  # how far the policy may move from the reference (higher = closer)
    desirable_weight: float = 1.0  # weight of the good answers' loss
    # the bad ones': TRL recommends desirable_weight * good / (undesirable_weight * bad) in [1, 4/3]
    undesirable_weight: float = 1.0
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"  # kto estimates a KL term from the batch (batch_size >= 2)


@dataclass
class EvaluationConfig:
    every_n_steps: int = 500
    system: Optional[str] = None
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 256
    temperature: float = 0.1  # 0 = greedy
    top_p: float = 0.75
    top_k: int = 40


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)  # null = full fine-tuning
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    rewards: list = field(default_factory=list)  # common.rewards.RewardEntry: a list, not a mapping (_build_rewards)
    source: Optional[str] = field(default=None, metadata={"internal": True})  # recipe file it came from


SECTIONS = {f.name: f for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return tp.__name__


def _coerce(value, tp):
    """Return value converted to tp, or raise ValueError. Only lossless conversions (int -> float) are made."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except ValueError:
                pass
        raise ValueError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    if tp is type(None):
        if value is None:
            return None
        raise ValueError
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError from None
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is dict and isinstance(value, dict):  # checked key by key where it is used (data sources)
        return value
    raise ValueError


# Names users bring from XTuner configs and HF TrainingArguments, mapped to ours for "did you mean".
KEY_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "max_epochs": "epochs", "accumulative_counts": "grad_accum",
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size", "max_norm": "max_grad_norm",
    "lora_alpha": "alpha", "lora_dropout": "dropout", "pack_to_max_length": "pack", "prompt_template": "template",
    "evaluation_inputs": "prompts", "evaluation_freq": "every_n_steps", "lr_scheduler_type": "scheduler",
    "torch_dtype": "dtype", "pretrained_model_name_or_path": "path", "data_path": "path", "rank": "r",
}


def _suggest(name: str, options, prefix: str = "") -> str:
    return did_you_mean(name, options, prefix, cutoff=0.5, aliases=KEY_ALIASES)


def _literal_names(tp) -> list[str]:
    """The string choices of a Literal, also inside Optional/Union: what a misspelt value is matched against."""
    if typing.get_origin(tp) is Literal:
        return [a for a in typing.get_args(tp) if isinstance(a, str)]
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [name for arg in typing.get_args(tp) for name in _literal_names(arg)]
    return []


def _build_section(cls, raw: dict, prefix: str, problems: list[str]):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    values = {}
    for key, value in raw.items():
        if key not in names:
            problems.append(f"unknown key `{prefix}.{key}`{_suggest(str(key), names, prefix + '.')}")
            continue
        try:
            values[key] = _coerce(value, hints[key])
        except ValueError:
            hint = did_you_mean(value, _literal_names(hints[key]), cutoff=0.5) if isinstance(value, str) else ""
            problems.append(f"`{prefix}.{key}`: got {value!r}, expected {_describe(hints[key])}{hint}")
    return cls(**values)


def _check_values(recipe: Recipe, problems: list[str], for_training: bool, check_machine: bool,
                  check_method) -> None:
    from transformers.trainer_utils import SchedulerType

    from common.templates import NAMES  # local: it imports nothing from here

    d, t = recipe.data, recipe.train
    recipe.model.dtype = precision.canonical(recipe.model.dtype)  # one spelling from here on: fp32 -> float32
    if not recipe.model.path:
        problems.append("`model.path` is required")
    elif for_training and not Path(recipe.model.path).exists() and not _could_be_hub_id(recipe.model.path):
        problems.append(f"`model.path`: {recipe.model.path} does not exist (download the model there first)")
    for key in ("path", "eval_path"):  # first: the sources' entries become DataSources here
        _check_sources(d, key, problems, for_training)
    if for_training and not d.paths:
        problems.append("`data.path` is required")
    if d.template not in NAMES:
        problems.append(f"`data.template`: unknown template `{d.template}`{_suggest(d.template, NAMES)}")
    if d.num_proc is not None and d.num_proc < 1:
        problems.append(f"`data.num_proc`: got {d.num_proc}, expected at least 1 (or null: the cores)")
    if d.max_length < 8:
        problems.append(f"`data.max_length`: got {d.max_length}, expected at least 8")
    if not 0.0 <= d.eval_fraction < 1.0:
        problems.append(f"`data.eval_fraction`: got {d.eval_fraction}, expected 0 <= x < 1")
    if len(t.betas) != 2:
        problems.append(f"`train.betas`: got {t.betas}, expected two numbers")
    for key in ("batch_size", "grad_accum", "save_steps", "logging_steps"):
        if getattr(t, key) < 1:
            problems.append(f"`train.{key}`: got {getattr(t, key)}, expected at least 1")
    if recipe.lora is None and recipe.model.quantization:
        problems.append("`model.quantization` needs LoRA: quantized weights cannot be fully fine-tuned (set `lora:` or drop quantization)")
    if t.scheduler not in {s.value for s in SchedulerType}:
        problems.append(f"`train.scheduler`: unknown scheduler `{t.scheduler}` (one of: {', '.join(s.value for s in SchedulerType)})")
    if not 0.0 <= t.warmup_ratio < 1.0:
        problems.append(f"`train.warmup_ratio`: got {t.warmup_ratio}, expected 0 <= x < 1")
    paths = FAST_PATHS if t.fast_paths is True else t.fast_paths or ()
    if "chunked_loss" in paths and "labelled_loss" not in paths:
        problems.append("`train.fast_paths`: chunked_loss is a way of computing labelled_loss; list both")
    if "packed_pairs" in paths and "packed_attention" not in paths:
        problems.append("`train.fast_paths`: packed_pairs runs on packed_attention (a pair's branch attends to its "
                        "prompt); list both")
    from common import trackers

    problems += [line for line in trackers.problems(t.report_to) if "unknown tracker" in line]
    if t.max_steps <= 0 and t.epochs <= 0:
        problems.append("`train.epochs` must be > 0 unless `train.max_steps` is set")
    if check_method is not None:
        check_method(recipe, problems)
    _check_preference(recipe, problems, for_training)
    _check_sharding(recipe, problems)
    if check_machine:
        _check_machine(recipe, problems)


def _check_sources(d: DataConfig, key: str, problems: list[str], for_training: bool) -> None:
    """The entries of data.path / data.eval_path that are sources (mappings): their keys, weights, names and files;
    each becomes a DataSource. A source's format is checked against train.method's formats with data.format
    (common.methods.table.check_recipe)."""
    from common.templates import NAMES

    value = getattr(d, key)
    if not isinstance(value, list) or not any(isinstance(e, dict) for e in value):
        return
    entries = []
    for i, entry in enumerate(value):
        where = f"data.{key}[{i}]"
        source = _build_section(DataSource, entry, where, problems) if isinstance(entry, dict) else DataSource(entry)
        entries.append(source)
        if not source.path:
            problems.append(f"`{where}.path` is required")
        elif for_training and not Path(source.path).is_file():
            problems.append(f"`{where}.path`: {source.path} does not exist")
        if source.weight is not None and source.weight <= 0:
            problems.append(f"`{where}.weight`: got {source.weight:g}, expected a share > 0")
        if source.template is not None and source.template not in NAMES:
            problems.append(f"`{where}.template`: unknown template `{source.template}`"
                            f"{_suggest(source.template, NAMES)}")
    weighted = [s.weight is not None for s in entries]
    if any(weighted) and not all(weighted):
        problems.append(f"`data.{key}`: give every source a weight (a mixture) or none (all of every file)")
    setattr(d, key, [{k: v for k, v in dataclasses.asdict(s).items() if v is not None} for s in entries])


def _check_preference(recipe: Recipe, problems: list[str], for_training: bool) -> None:
    """The preference values and model.adapter (train.method against its data and sections is common.methods')."""
    p, m = recipe.preference, recipe.model
    if for_training:
        from common import rewards  # imports nothing from here

        rewards.check(recipe.rewards, problems)
    if p.beta <= 0 or p.orpo_lambda <= 0:
        problems.append("`preference.beta` and `preference.orpo_lambda` must be > 0")
    if p.loss_type == "exo_pair" and not 0.0 < p.label_smoothing < 0.5:
        problems.append("`preference.label_smoothing`: loss_type exo_pair needs 0 < x < 0.5 (e.g. 1e-3)")
    elif not 0.0 <= p.label_smoothing < 0.5:
        problems.append(f"`preference.label_smoothing`: got {p.label_smoothing}, expected 0 <= x < 0.5")
    if m.adapter is not None:
        if recipe.lora is None:
            problems.append("`model.adapter` continues a LoRA adapter: it cannot be combined with `lora: null`")
        elif for_training and not Path(m.adapter, "adapter_config.json").is_file():
            problems.append(f"`model.adapter`: {m.adapter} holds no adapter_config.json (not a PEFT adapter directory)")


def _check_sharding(recipe: Recipe, problems: list[str]) -> None:
    """train.fsdp and the ZeRO-3 preset against what cannot share a run with them (a DeepSpeed JSON's stage is read
    with the machine checks)."""
    t = recipe.train
    if t.deepspeed == "zero3":
        _check_prompts_unsharded(recipe, problems, "ZeRO-3 (`train.deepspeed`)")
    if t.fsdp is None:
        return
    if t.deepspeed is not None:
        problems.append("`train.fsdp` and `train.deepspeed` both shard the model: set one of them")
    if recipe.model.quantization:
        problems.append("`train.fsdp` with `model.quantization` (QLoRA) is not supported: FSDP would need the "
                        "quantized weights stored in the compute dtype, which train.py does not set up; use LoRA in "
                        "bfloat16 with train.fsdp, or QLoRA without it")
    _check_prompts_unsharded(recipe, problems, "`train.fsdp`")


def weights_sharded(t: TrainConfig) -> bool:
    """Whether each process holds only a shard of the weights (train.fsdp, or ZeRO-3): outside the model's forward a
    layer's weight is then a shard, not the whole matrix. The DeepSpeed JSON was checked with the recipe."""
    if t.fsdp is not None or t.deepspeed == "zero3":
        return True
    return t.deepspeed not in (None, *DEEPSPEED_PRESETS) and read_json(t.deepspeed)["zero_optimization"]["stage"] == 3


def _check_prompts_unsharded(recipe: Recipe, problems: list[str], sharding: str) -> None:
    # The main process answers the evaluation prompts alone; with sharded weights its forward waits for the other
    # processes' shards, which never come (a hang until the collective times out).
    if recipe.evaluation.prompts:
        problems.append(f"`evaluation.prompts` cannot be answered during training under {sharding} (each process holds "
                        "a shard of the weights, and the main process answers alone); set evaluation.prompts: [] "
                        "and answer them after training with eval.py or chat.py")


# `train.deepspeed` presets. The Trainer fills the "auto" values from its own arguments (batch sizes, accumulation,
# clipping, precision).
DEEPSPEED_PRESETS = {
    "zero2": {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                    "reduce_bucket_size": "auto"}},
    "zero3": {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                    "stage3_gather_16bit_weights_on_model_save": True}},
}
DEEPSPEED_AUTO = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                  "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def _check_machine(recipe: Recipe, problems: list[str]) -> None:
    """What this machine can do with the recipe: GPU-only features, the precision, DeepSpeed."""
    import importlib.util

    import torch

    from common import trackers

    problems += [line for line in trackers.problems(recipe.train.report_to) if "pip install" in line]
    cuda = torch.cuda.is_available()
    m, ds = recipe.model, recipe.train.deepspeed
    if precision.resolve(m.dtype).dtype == torch.float16 and not cuda:
        problems.append("`model.dtype: float16` needs a GPU (fp16 mixed precision); use auto, bfloat16 or float32 on CPU")
    if m.quantization == "8bit" and recipe.lora is not None and recipe.lora.use_dora and not cuda:
        problems.append("`lora.use_dora` with `model.quantization: 8bit` fails in bitsandbytes' CPU backend; use 4bit or drop DoRA")
    if m.attn_implementation in ("flash_attention_2", "flash_attention_3") and not cuda:
        problems.append(f"`model.attn_implementation: {m.attn_implementation}` needs a CUDA GPU")
    if recipe.train.fsdp is not None and not cuda:
        # accelerate 1.15 shards only on accelerator devices: CPU processes would silently train as plain data-parallel
        problems.append("`train.fsdp` needs CUDA GPUs (accelerate shards only on accelerator devices); on CPU drop "
                        "the key: torchrun trains data-parallel")
    if ds is None:
        return
    if ds not in DEEPSPEED_PRESETS:
        if not Path(ds).is_file():
            problems.append(f"`train.deepspeed`: {ds} is neither {', '.join(DEEPSPEED_PRESETS)} nor an existing JSON file")
        else:
            try:
                zero = read_json(ds).get("zero_optimization")
                if not isinstance(zero, dict) or zero.get("stage") not in (0, 1, 2, 3):
                    problems.append(f"`train.deepspeed`: {ds} needs `zero_optimization.stage` set to 0, 1, 2 or 3")
                elif zero["stage"] == 3:
                    _check_prompts_unsharded(recipe, problems, "ZeRO-3 (`train.deepspeed`)")
            except UserError as e:
                problems.append(f"`train.deepspeed`: {e}")
    if importlib.util.find_spec("deepspeed") is None:
        # not a requirement: on a CPU its first run compiles a C++ op for a few minutes (docs/distributed.md#deepspeed)
        problems.append("`train.deepspeed` needs the deepspeed package (pip install deepspeed)")


def _could_be_hub_id(path: str) -> bool:
    """`org/name` that is not a local path (whose first part would exist, like `models/`)."""
    parts = Path(path).parts
    return len(parts) == 2 and not path.startswith((".", "/", "~")) and not Path(parts[0]).exists()


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise UserError(f"override `{text}`: expected SECTION.KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def load_recipe(path: str | Path, overrides: list[str] = (), for_training: bool = True,
                check_machine: bool | None = None, check_method=None) -> Recipe:
    """for_training=False: a run's saved recipe read for its settings elsewhere (its model and data paths are
    relative to where training ran). check_machine (default: for_training): can this machine train it (GPU-only
    features, precision, DeepSpeed); --dry-run checks the data without asking. check_method(recipe, problems): the
    recipe against its train.method, with the other problems (common.methods.table.load_recipe passes it: the
    methods sit above this module, which imports none of them)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    with reading(path, "not readable as a YAML recipe"):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    problems: list[str] = []
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1:  # a whole section, e.g. `lora=null` for full fine-tuning
            raw[keys[0]] = value
        elif len(keys) == 2:
            if not isinstance(raw.get(keys[0]), dict):  # also re-enables a section set to null
                raw[keys[0]] = {}
            raw[keys[0]][keys[1]] = value
        else:
            problems.append(f"override `{text}`: expected SECTION.KEY=VALUE")
    recipe = from_dict(raw, problems, where=str(path), for_training=for_training, check_machine=check_machine,
                       check_method=check_method)
    recipe.source = str(path)
    if recipe.train.output_dir is None:
        recipe.train.output_dir = f"work_dirs/{path.stem}"
    return recipe


def from_dict(raw: dict, problems: list[str] | None = None, where: str = "recipe", for_training: bool = True,
              check_machine: bool | None = None, check_method=None) -> Recipe:
    problems = [] if problems is None else problems
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            problems.append(f"unknown section `{name}`{_suggest(str(name), SECTIONS)}")
            continue
        if name == "rewards":
            sections[name] = _build_rewards(value, problems)
            continue
        cls = SECTIONS[name].default_factory
        if value is None:
            if name == "lora":
                sections[name] = None
                continue
            value = {}
        if not isinstance(value, dict):
            problems.append(f"section `{name}`: expected a mapping of keys, got {value!r}")
            continue
        sections[name] = _build_section(cls, value, name, problems)
    recipe = Recipe(**sections)
    _check_values(recipe, problems, for_training, for_training if check_machine is None else check_machine,
                  check_method)
    if problems:
        n = len(problems)
        raise UserError(f"{where}: {n} problem{'s' if n > 1 else ''}:\n  - " + "\n  - ".join(problems))
    return recipe


def _build_rewards(raw, problems: list[str]) -> list:
    """`rewards:` as common.rewards.RewardEntry objects: each entry one catalog name with its settings (a mapping;
    `python:` takes the module:function string) and an optional weight."""
    from common.rewards import CATALOG, SHORTHAND, RewardEntry  # imports nothing from here

    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.append("`rewards`: expected a list of entries, e.g. `- repetition: {n: 4}`")
        return []
    entries = []
    for i, item in enumerate(raw):
        where = f"rewards[{i}]"
        names = [k for k in item if k != "weight"] if isinstance(item, dict) else []
        if len(names) != 1:
            problems.append(f"`{where}`: expected one reward ({', '.join(CATALOG)}) and an optional weight, got {item!r}")
            continue
        name, value = str(names[0]), item[names[0]]
        if name not in CATALOG:
            problems.append(f"`{where}`: unknown reward `{name}`{_suggest(name, CATALOG)}")
            continue
        if name in SHORTHAND and isinstance(value, str):
            value = {SHORTHAND[name]: value}
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"`{where}.{name}`: expected a mapping of settings, got {value!r}")
            continue
        settings = _build_section(CATALOG[name], value, f"{where}.{name}", problems)
        try:
            weight = _coerce(item.get("weight", 1.0), float)
        except ValueError:
            problems.append(f"`{where}.weight`: got {item['weight']!r}, expected a number")
            continue
        entries.append(RewardEntry(name, settings, weight, i))
    return entries


def to_dict(recipe: Recipe) -> dict:
    out = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if f.metadata.get("internal"):
            continue
        out[f.name] = ([e.to_dict() for e in value] if isinstance(value, list) else
                       None if value is None else dataclasses.asdict(value))
    return out


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True), encoding="utf-8")
