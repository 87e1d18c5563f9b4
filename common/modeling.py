"""Tokenizer and model loading from a recipe: dtype, bitsandbytes quantization, PEFT LoRA (or full fine-tuning)."""
from __future__ import annotations

from pathlib import Path

import torch

from common.cli import UserError
from common.recipe import Recipe


def _load_error(key: str, path: str, e: Exception) -> UserError:
    where = "" if Path(path).is_dir() else " (not a local directory, and no hub copy could be fetched)"
    return UserError(f"`{key}`: cannot load {path}{where}: {str(e).splitlines()[0]}")


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    path = recipe.model.tokenizer or recipe.model.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error("model.tokenizer" if recipe.model.tokenizer else "model.path", path, e) from None
    if tokenizer.pad_token is None:  # batching needs one; padded positions carry label -100 anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(recipe: Recipe, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if recipe.model.quantization == "4bit":  # QLoRA: NF4 storage, double-quantized scales
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)
    if recipe.model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      use_dora=lora.use_dora, use_rslora=lora.use_rslora, bias=lora.bias, task_type="CAUSAL_LM")


def check_combination(recipe: Recipe, dtype: torch.dtype) -> None:
    problems = []
    if recipe.lora is None and recipe.model.quantization:
        problems.append("`model.quantization` needs LoRA: quantized weights cannot be fully fine-tuned")
    if dtype == torch.float16 and not torch.cuda.is_available():
        problems.append("`model.dtype: float16` needs a GPU (fp16 mixed precision); use bfloat16 or float32 on CPU")
    if recipe.model.quantization == "8bit" and recipe.lora is not None and recipe.lora.use_dora and not torch.cuda.is_available():
        problems.append("`lora.use_dora` with `model.quantization: 8bit` fails in bitsandbytes' CPU backend; use 4bit or drop DoRA")
    if recipe.model.attn_implementation in ("flash_attention_2", "flash_attention_3") and not torch.cuda.is_available():
        problems.append(f"`model.attn_implementation: {recipe.model.attn_implementation}` needs a CUDA GPU")
    if problems:
        raise UserError("; ".join(problems))


def load_model(recipe: Recipe, dtype: torch.dtype):
    """The model ready for training: quantized + k-bit prepared and wrapped in LoRA as the recipe says."""
    from transformers import AutoModelForCausalLM

    check_combination(recipe, dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=recipe.model.trust_remote_code)
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    quant = quantization_config(recipe, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model = AutoModelForCausalLM.from_pretrained(recipe.model.path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise _load_error("model.path", recipe.model.path, e) from None
    # A KV cache during training makes transformers skip its packed-sequence mask: samples would attend across
    # boundaries. Generation (the eval callback) turns it back on for its own calls.
    model.config.use_cache = False
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(recipe))
    return model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count their packed elements twice, as PEFT does."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
