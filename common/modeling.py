"""Tokenizer and model loading: the precision, bitsandbytes quantization, PEFT LoRA for training; the same loaders,
plus an adapter on top, for generation (chat, eval, the server)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from common.artifacts import check_model_files, check_tokenizer_files
from common.cli import UserError, reading


def _loading(what: str, path):
    """The boundary around a from_pretrained: any failure is the files' (or the hub's), said in one line."""
    where = "" if Path(path).is_dir() else " (not a local directory, and no hub copy could be fetched)"
    return reading(path, f"{what}: cannot load it{where}")


def load_tokenizer(path, trust_remote_code: bool = False, what: str = "tokenizer", gguf_file: Optional[str] = None):
    """The one tokenizer loader: its files checked first (a damaged one is named), then AutoTokenizer, as saved (merge
    and convert copy it on unchanged). gguf_file: the tokenizer inside that GGUF file in `path`."""
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
    with _loading(what, path):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, gguf_file=gguf_file)


def _with_pad_token(tokenizer):
    if tokenizer.pad_token is None:  # batching needs one; padded positions carry label -100 anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def recipe_tokenizer(recipe):
    m = recipe.model
    what = "`model.tokenizer`" if m.tokenizer else "`model.path`"
    return _with_pad_token(load_tokenizer(m.tokenizer or m.path, m.trust_remote_code, what))


def quantization_config(quantization: Optional[str], compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":  # QLoRA: NF4 storage, double-quantized scales
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_causal_lm(path, dtype: torch.dtype, quantization: Optional[str] = None, trust_remote_code: bool = False,
                   attn_implementation: Optional[str] = None, what: str = "`model.path`"):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quant = quantization_config(quantization, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    check_model_files(path)
    with _loading(what, path):
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    # transformers fills weights it did not find with random values, and only warns: a damaged index or a missing
    # tensor would otherwise train or chat on noise.
    missing = info.get("missing_keys") or []
    if missing:
        raise UserError(f"{path}: the model's weights lack {len(missing)} tensor(s) its config.json needs, "
                        f"e.g. {sorted(missing)[0]} (damaged or incomplete checkpoint?)")
    return model


def lora_config(recipe):
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      use_dora=lora.use_dora, use_rslora=lora.use_rslora, bias=lora.bias, task_type="CAUSAL_LM")


def load_model(recipe, dtype: torch.dtype):
    """The model ready for training: quantized + k-bit prepared and wrapped in LoRA as the recipe says (the recipe's
    checks ran when it was loaded). common.acceleration.apply adds the faster paths."""
    m = recipe.model
    model = load_causal_lm(m.path, dtype, m.quantization, m.trust_remote_code, m.attn_implementation)
    # A KV cache during training makes transformers skip its packed-sequence mask: samples would attend across
    # boundaries. Generation (the eval callback) turns it back on for its own calls.
    model.config.use_cache = False
    if m.quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.adapter is not None:  # continue a trained adapter (an SFT run's final/): its own LoRA settings apply
        from peft import PeftModel

        with _loading("`model.adapter`", m.adapter):
            model = PeftModel.from_pretrained(model, m.adapter, is_trainable=True)
    elif recipe.lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(recipe))
    return model


def load_for_generation(source, dtype: str = "auto", bits: Optional[int] = None, threaded_products: bool = True):
    """(model, tokenizer) of an artifacts.ModelSource, ready to generate: the precision chosen as for training
    (`auto` by the hardware), an adapter loaded on top with PEFT. threaded_products: float32 one-row products on
    every thread (common.decoding.split_products: the same results, faster decoding); off, the layers as they come."""
    from transformers.utils import logging as hf_logging

    from common.precision import resolve

    hf_logging.disable_progress_bar()  # a chat's stderr is for the conversation
    precision = resolve(dtype)
    if precision.warning:
        print(f"warning: {precision.warning}", file=sys.stderr)
    trust = source.recipe.model.trust_remote_code
    tokenizer = _with_pad_token(load_tokenizer(source.tokenizer_dir, trust))
    model = load_causal_lm(source.model, precision.dtype, f"{bits}bit" if bits else None, trust, what="model")
    if threaded_products:
        from common.decoding import split_products

        split_products(model)
    if source.adapter is not None:
        from peft import PeftModel

        with _loading("adapter", source.adapter):
            model = PeftModel.from_pretrained(model, source.adapter)
    return model.eval(), tokenizer


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count their packed elements twice, as PEFT does."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
