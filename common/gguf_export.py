"""A merged HF model directory -> one GGUF file, with the `gguf` package's writer, tensor-name maps and vocab helpers
(no llama.cpp build). Tensors stream from the memory-mapped safetensors one at a time, so memory stays near the
largest tensor; the file is written under a temporary name and renamed when complete.

The GGUF carries the tokenizer (byte-level BPE: tokens, types, merges, special ids, the pre-tokenizer's name) and,
as `tokenizer.chat_template`, the training template as Jinja, so llama.cpp, Ollama and transformers render prompts
as training did.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import artifacts
from common.cli import UserError, reading

FILE_NAME = "model-{type}.gguf"


@dataclass(frozen=True)
class OutType:
    """One `--gguf` type: llama.cpp's name for the file's type, the type its weight matrices take, and for a
    quantized type the share of positions at which verify wants the GGUF's greedy pick to equal the merged model's."""

    file_type: str  # a gguf.LlamaFileType member
    matrix: str  # a gguf.GGMLQuantizationType member
    agreement: float | None = None  # verify's limit; None: float types (all types' logits are compared as well)


# The quantized types are those the `gguf` package's numpy quantizers write (no llama.cpp build); k-quants come from
# llama.cpp's llama-quantize run on the f16 file (docs/export.md#k-quants). The agreement limits sit below what
# SmolLM2-135M-Instruct measured on 67 positions (docs/performance.md#gguf-export: q8_0 98.5%, q5_1 73.1%, q5_0 83.6%,
# q4_0 68.7%; a coarse figure, hence the margin) and far above what a damaged file gives. The exact check is verify's
# logits against the same rounding.
OUT_TYPES = {
    "f32": OutType("ALL_F32", "F32"),
    "f16": OutType("MOSTLY_F16", "F16"),
    "q8_0": OutType("MOSTLY_Q8_0", "Q8_0", 0.9),
    "q5_1": OutType("MOSTLY_Q5_1", "Q5_1", 0.6),
    "q5_0": OutType("MOSTLY_Q5_0", "Q5_0", 0.6),
    "q4_1": OutType("MOSTLY_Q4_1", "Q4_1", 0.5),
    "q4_0": OutType("MOSTLY_Q4_0", "Q4_0", 0.5),
}
TYPES = tuple(OUT_TYPES)  # merge.py --gguf's choices


@dataclass(frozen=True)
class Architecture:
    gguf_arch: object  # gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's llama graph expects q/k rows in Meta's rotary order; transformers undoes it on load
    norm_shift: float = 0.0  # added to RMSNorm weights: Gemma's norms scale by (1 + w), llama.cpp's graph by w
    writes_window: bool = False  # llama.cpp's graph reads `attention.sliding_window`; else a windowed model is refused
    global_every: int = 0  # llama.cpp's graph makes every n-th layer global, the others local (Gemma 3: 6), fixed


def architectures() -> dict[str, Architecture]:
    """HF model_type -> how its GGUF is written: one row per architecture (Mistral runs on llama.cpp's llama graph,
    as its own converter writes it). Not Phi-3: the rows would be right (transformers reads such a file back with
    the model's logits), but llama.cpp loads a phi3 vocabulary only with Phi-3's own <|end|> and <|endoftext|> and
    then drops the whitespace after special tokens, so a prompt in the training template tokenizes differently there
    (tested in tests/test_families.py against llama-cpp-python 0.3.36)."""
    import gguf

    A = gguf.MODEL_ARCH
    return {"llama": Architecture(A.LLAMA, True), "mistral": Architecture(A.LLAMA, True),
            "qwen2": Architecture(A.QWEN2, False), "qwen3": Architecture(A.QWEN3, False),
            "gemma3_text": Architecture(A.GEMMA3, False, norm_shift=1.0, writes_window=True, global_every=6)}


def _rope_entries(config) -> list[dict]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return [v for v in params.values() if isinstance(v, dict)] or [params]


def sliding_window(config) -> int | None:
    """The attention window the model runs with, or None (Qwen's configs carry one that use_sliding_window turns
    off)."""
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True) or window >= config.max_position_embeddings:
        return None
    return window


def rope_theta(config) -> float:
    """The rotary base of the global layers (Gemma 3 keeps one per layer type; llama.cpp fixes its local layers' base
    at 10000, which export checks)."""
    params = getattr(config, "rope_parameters", None) or {}
    return getattr(config, "rope_theta", None) or params.get("full_attention", params)["rope_theta"]


def gguf_path(out_dir: Path, qtype: str) -> Path:
    return Path(out_dir) / FILE_NAME.format(type=qtype)


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary layout (halves) -> the interleaved pairs llama.cpp's llama graph rotates."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permuted_heads(arch: Architecture, config, gguf_name: str) -> int | None:
    """How many heads the tensor holds whose rotary halves llama.cpp stores interleaved (_permute on export,
    _unpermute on reading back): the query's and the key's weights of an architecture that permutes them; else None."""
    if arch.permute_qk and gguf_name.endswith("attn_q.weight"):
        return config.num_attention_heads
    if arch.permute_qk and gguf_name.endswith("attn_k.weight"):
        return config.num_key_value_heads
    return None


def gguf_names(arch: Architecture, config, keys) -> dict[str, str | None]:
    """HF tensor name -> its GGUF name through gguf's own name table (None where the table has none)."""
    import gguf

    table = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    return {key: table.get_name(key, try_suffixes=(".weight", ".bias")) for key in keys}


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The reverse of _permute: llama.cpp's interleaved rotary pairs -> HF's halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_weights(gguf_file: Path, model) -> dict[str, torch.Tensor]:
    """A GGUF's tensors as float32 under the names of `model`'s state dict (an HF model of an architecture of
    architectures(), its tensors anywhere, the meta device included): the reverse of export, through the same gguf
    name table. transformers' own GGUF loader gives the same tensors but parses the file's 49k-token vocabulary twice
    and builds its name table once per module: 19 s for SmolLM2 on the 2-core EPYC, where this takes ~6 s (the demo
    model's conversion, at the start of a fresh `make test`)."""
    import gguf

    config = model.config
    arch = architectures()[config.model_type]
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(gguf_file).tensors}
    weights = {}
    for name, gguf_name in gguf_names(arch, config, model.state_dict()).items():
        if gguf_name not in tensors:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # the file has no output.weight: the logits are the token embeddings'
            raise UserError(f"{gguf_file}: no tensor {gguf_name} for `{name}` of {config.model_type}")
        stored = tensors[gguf_name]
        tensor = torch.from_numpy(np.array(gguf.quants.dequantize(stored.data, stored.tensor_type), np.float32))
        if rotary_heads := permuted_heads(arch, config, gguf_name):
            tensor = _unpermute(tensor, rotary_heads)
        if arch.norm_shift and gguf_name.endswith("norm.weight"):
            tensor = tensor - arch.norm_shift
        weights[name] = tensor
    return weights


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the way this tokenizer splits text before BPE: GPT-2's built-in
    regex, or a Split regex that transformers' GGUF reader knows by name. Anything else would tokenize differently
    in llama.cpp, so it is refused rather than guessed."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        names = [name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex]
        if names:
            return names[0]
    raise UserError(f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one "
                    "llama.cpp knows by name (GPT-2's, Qwen2's, Llama-3's...): the GGUF would tokenize differently")


def _vocab(tokenizer, model_dir: Path, vocab_size: int):
    """(tokens, token types): the BPE vocabulary as gguf's BpeVocab reads it, special added tokens as CONTROL,
    other added tokens as USER_DEFINED, and padding rows up to the embedding size as UNUSED."""
    import gguf
    from gguf.vocab import BpeVocab

    try:
        vocab = BpeVocab(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"GGUF export needs a byte-level BPE tokenizer (tokenizer.json): {e}") from None
    tokens = [t if isinstance(t, str) else t.decode("utf-8") for t, _, _ in vocab.all_tokens()]
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id < len(types):
            types[token_id] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    if len(tokens) > vocab_size:
        raise UserError(f"GGUF export: the tokenizer has {len(tokens)} tokens, the model's embedding only {vocab_size}")
    for i in range(len(tokens), vocab_size):  # rows the model has but the tokenizer never produces
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, types


def _ggml_type(qtype: str, shape: tuple[int, ...], output: bool):
    """The type one tensor is stored in, by llama.cpp's rules (llama-quantize's llama_tensor_get_type):
    - norms and biases (1-D) stay float32: tiny, and every token's activations pass through them;
    - a quantized row must hold whole 32-value blocks, else it stays f16;
    - the output projection (`output`: output.weight, or the token embeddings when they are tied to it) of a 4/5-bit
      file is Q8_0: its errors land directly on the logits, so llama.cpp keeps it at Q6_K for these types; the
      `gguf` package cannot write Q6_K, and Q8_0 is the nearest it can (untied token embeddings are only looked up,
      one row per token, and take the file's type, as in llama.cpp)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or qtype == "f32":
        return T.F32
    matrix = T[OUT_TYPES[qtype].matrix]
    if matrix == T.F16 or shape[-1] % 32:
        return T.F16
    return T.Q8_0 if output else matrix


def end_of_turn_id(template, tokenizer) -> int | None:
    """The token that ends an assistant turn as training wrote it (ChatML's <|im_end|>, Llama 3's <|eot_id|>, the
    tokenizer's EOS for templates that append it), for `tokenizer.ggml.eot_token_id`: without that key llama.cpp
    guesses the end of turn from token texts, and on a ChatML model it picks <|endoftext|>. It is the token that
    follows an answer's own tokens in the training encoding, when that token is a single stop word of the template
    or a special added token (CONTROL in the GGUF). None when the answer ends in text of several tokens (a stop word
    the vocabulary does not hold as one token, e.g. `<end_of_turn>` on a tokenizer without it) or in plain text: no
    one token ends the turn, and a guessed one would stop early or never; the Modelfile's stop strings cover those."""
    from common.conversation import Turn
    from common.templates import IGNORE

    answer = "OK"  # one word that encodes alike alone and before a special token
    try:
        ids, labels = template.encode_ids(tokenizer, [Turn("hi", answer)])
    except UserError:  # no turns to read the end off (`template: tokenizer` on a tokenizer without a chat template)
        return None
    trained = [token for token, label in zip(ids, labels) if label != IGNORE]
    own = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if trained[:len(own)] != own or len(trained) == len(own):
        return None
    ends = {token_id for token_id, added in tokenizer.added_tokens_decoder.items() if added.special}
    for word in template.stop_words(tokenizer):
        word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(word_ids) == 1:
            ends.add(word_ids[0])
    return trained[len(own)] if trained[len(own)] in ends else None


def _tensor_info(shape: tuple[int, ...], ggml_type) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, numpy dtype, bytes) as GGUFWriter.add_tensor_info takes them: quantized data as its uint8 blocks."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    T = gguf.GGMLQuantizationType
    if ggml_type in (T.F32, T.F16):
        dtype = np.dtype(np.float32 if ggml_type == T.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = quant_shape_to_byte_shape(shape, ggml_type)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _encode(tensor: torch.Tensor, ggml_type) -> np.ndarray:
    import gguf
    from gguf.quants import quantize

    data = tensor.to(torch.float32).contiguous().numpy()
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return data
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return quantize(data, ggml_type)


def storage_plan(weights, arch: Architecture, config, qtype: str) -> list[tuple[str, str, tuple[int, ...], object]]:
    """(HF name, GGUF name, shape, ggml type) of every tensor of the model, in file order: what export writes and
    what verify rounds the merged model to."""
    names = gguf_names(arch, config, weights.shape)
    for key, name in names.items():
        if name is None:
            raise UserError(f"GGUF export: no GGUF name for tensor `{key}` of {config.model_type}")
    # llama.cpp computes the logits with the token embeddings when the file has no output.weight (tied embeddings)
    output = "output.weight" if "output.weight" in names.values() else "token_embd.weight"
    return [(key, names[key], shape, _ggml_type(qtype, shape, names[key] == output))
            for key, shape in weights.shape.items()]


def read_model(model_dir: Path):
    """(config, tokenizer) of the HF model to export, read at the boundary: a damaged file is one line."""
    from transformers import AutoConfig

    from common.modeling import load_tokenizer

    with reading(model_dir / artifacts.MODEL_CONFIG, "not a readable model config"):
        config = AutoConfig.from_pretrained(model_dir)
    return config, load_tokenizer(model_dir)


def export(model_dir: Path, qtype: str, chat_template: str | None, eot: int | None, name: str, config,
           tokenizer) -> Path:
    """Write MODEL_DIR/model-<qtype>.gguf from the HF model in MODEL_DIR (its config and tokenizer, as read_model
    gave them; the chat template and end-of-turn token id from the training template); returns its path."""
    import gguf

    from common.weights import ModelWeights

    arch = architectures().get(config.model_type)
    if arch is None:
        raise UserError(f"GGUF export supports the {', '.join(architectures())} architectures "
                        f"(SmolLM2, Llama, Mistral, Qwen1.5-3, Gemma 3 text); {model_dir} is `{config.model_type}`")
    for params in _rope_entries(config):
        if params.get("rope_type", "default") != "default":
            raise UserError(f"GGUF export: rope scaling {params} is not written by this exporter")
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
    local_base = local.get("rope_theta", 10000.0)
    if local_base != 10000.0:
        raise UserError(f"GGUF export: the local layers' rope base {local_base} is not llama.cpp's fixed 10000")
    window = sliding_window(config)
    layer_types = getattr(config, "layer_types", None)
    if arch.global_every and layer_types:
        fixed = ["full_attention" if (n + 1) % arch.global_every == 0 else "sliding_attention"
                 for n in range(len(layer_types))]
        if list(layer_types) != fixed:
            raise UserError(f"GGUF export: llama.cpp's {config.model_type} graph makes every {arch.global_every}th "
                            f"layer global; this model's layer types differ ({', '.join(layer_types)})")
    if window is not None and not arch.writes_window:
        raise UserError(f"GGUF export: {config.model_type} with a sliding window of {window} would run with full "
                        "attention in llama.cpp's graph for it")
    pre = pre_tokenizer_name(tokenizer)
    weights = ModelWeights(model_dir)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    plan = storage_plan(weights, arch, config, qtype)
    out = gguf_path(model_dir, qtype)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden / heads unless told (Qwen3, Gemma 3)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if window is not None:
        writer.add_sliding_window(window)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[OUT_TYPES[qtype].file_type])
    tokens, types = _vocab(tokenizer, model_dir, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.chat_template = chat_template  # the training template, whatever tokenizer_config.json says
    special.add_special_token = {"bos": False, "eos": False}  # the template writes BOS/EOS itself, as in training
    special.special_token_ids.pop("eot", None)  # the template's, not one gguf guessed from the tokenizer's files
    if eot is not None:  # written as llama.cpp's convert_hf_to_gguf.py writes it (uint32 tokenizer.ggml.eot_token_id)
        special.special_token_ids["eot"] = eot
    special.add_to_gguf(writer, quiet=True)
    for key, gguf_name, shape, ggml_type in plan:  # the header lists every tensor before any data is written
        writer.add_tensor_info(gguf_name, *_tensor_info(shape, ggml_type), raw_dtype=ggml_type)
    with artifacts.atomic_file(out) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with weights.reader() as read:
                for key, gguf_name, shape, ggml_type in plan:
                    tensor = read(key)
                    if rotary_heads := permuted_heads(arch, config, gguf_name):
                        tensor = _permute(tensor, rotary_heads)
                    if arch.norm_shift and gguf_name.endswith("norm.weight"):
                        tensor = tensor.float() + arch.norm_shift
                    writer.write_tensor_data(_encode(tensor, ggml_type))
        finally:  # closed before the rename, or before the half-written file is removed
            writer.close()
    return out


def ship(model_dir: Path, qtype: str, recipe, name: str) -> tuple[Path, Path | None, str | None]:
    """The GGUF and, beside it, an Ollama Modelfile, both from the run's template, system prompt and sampling
    settings. Returns (gguf, Modelfile or None, why there is no Modelfile)."""
    from common.ollama import write_modelfile
    from common.templates import get_template

    config, tokenizer = read_model(model_dir)
    template = get_template(recipe.data.template, recipe.data.thinking)
    path = export(model_dir, qtype, template.chat_template(tokenizer), end_of_turn_id(template, tokenizer), name,
                  config, tokenizer)
    try:
        modelfile = write_modelfile(model_dir, path.name, template, tokenizer, recipe.data.system, recipe.evaluation,
                                    recipe.data.max_length)
    except UserError as e:
        return path, None, str(e)
    return path, modelfile, None


def _round_as_stored(model, model_dir: Path, config, qtype: str) -> None:
    """The model's weights as the file stores them: each tensor through its ggml type and back (gguf.quants), so that
    what is left between the GGUF's logits and the model's is the file's doing (a wrong byte, type or layout), not the
    rounding. Row blocks commute with the q/k row permutation, so the HF layout rounds as the file's does."""
    from gguf.quants import dequantize, quantize

    from common.weights import ModelWeights

    types = {key: t for key, _, _, t in storage_plan(ModelWeights(model_dir), architectures()[config.model_type],
                                                     config, qtype)}
    for name, p in model.named_parameters():
        if name in types:  # a tied lm_head is the embeddings' own parameter, listed once
            p.copy_(torch.from_numpy(dequantize(quantize(p.numpy(), types[name]), types[name]).reshape(p.shape)))


@torch.no_grad()
def verify(model_dir: Path, gguf_file: Path, qtype: str, recipe, max_new_tokens: int = 32) -> dict:
    """Load the GGUF back through transformers (its tensors dequantized by gguf.quants.dequantize) and compare it
    with the HF model it came from: logits (against the model rounded as the file stores it, but for f32), greedy
    answers on the evaluation prompts (quantized types, each with its limit in OUT_TYPES), the chat template's token
    ids, the Modelfile's TEMPLATE."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from common.conversation import Turn, turns_to_messages
    from common.merging import VERIFY_PROMPTS
    from common.modeling import load_tokenizer
    from common.ollama import render_go
    from common.templates import get_template

    config, tokenizer = read_model(model_dir)
    template = get_template(recipe.data.template, recipe.data.thinking)
    system = recipe.data.system
    with tempfile.TemporaryDirectory() as alone:  # the GGUF by itself: no tokenizer files beside it to mask its own
        (Path(alone) / gguf_file.name).symlink_to(gguf_file.resolve())
        import transformers.modeling_gguf_pytorch_utils as loader

        bar, loader.tqdm = loader.tqdm, lambda items, **kwargs: items  # its plain tqdm ignores transformers' switch
        try:
            g_tokenizer = load_tokenizer(alone, what="GGUF tokenizer", gguf_file=gguf_file.name)
            g_model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf_file.name, dtype=torch.float32).eval()
        finally:
            loader.tqdm = bar
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    report = {"type": qtype}

    conversation = [Turn("我最近总是失眠", "能说说通常几点睡吗？", system or "你是一位心理咨询师。"),
                    Turn("一般凌晨两点", "我们先从固定起床时间开始。"), Turn("好的，谢谢", "不客气。")]
    training_ids = template.encode_ids(tokenizer, conversation)[0]
    messages = turns_to_messages(conversation)
    rendered = g_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    report["chat_template_ids_equal"] = list(rendered) == training_ids
    modelfile = model_dir / artifacts.MODELFILE
    if modelfile.is_file():
        go = modelfile.read_text(encoding="utf-8").split('TEMPLATE """', 1)[1].split('"""', 1)[0]
        text = render_go(go, conversation[0].system, messages[1:])
        report["modelfile_ids_equal"] = tokenizer(text, add_special_tokens=False)["input_ids"] == training_ids

    prompts = recipe.evaluation.prompts or VERIFY_PROMPTS
    inputs = [torch.tensor([template.encode_ids(tokenizer, [Turn(p, None, system)])[0]]) for p in prompts]
    agreement = OUT_TYPES[qtype].agreement
    if agreement is not None:  # quantized: the greedy answers, the GGUF scored on the HF model's answer tokens
        agree = total = 0
        for ids in inputs:
            answer = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
            picks = g_model(torch.cat([ids, answer], 1)).logits[0, ids.shape[1] - 1:-1].argmax(-1)
            agree, total = agree + int((picks == answer[0]).sum()), total + answer.shape[1]
        report.update(greedy_token_agreement=agree / max(total, 1), tokens=total, agreement_limit=agreement)

    def max_diff() -> float:
        return max((g_model(ids).logits - model(ids).logits).abs().max().item() for ids in inputs)

    report["max_abs_diff_vs_float32"] = max_diff()
    if qtype != "f32":  # the file stores rounded matrices: compare with the same rounding, report the rounding too
        _round_as_stored(model, model_dir, config, qtype)
    report.update(max_abs_diff=max_diff(), limit=1e-4 if qtype == "f32" else 1e-2)
    report["ok"] = (report["max_abs_diff"] <= report["limit"] and report.get("greedy_token_agreement", 1) >= (agreement or 0)
                    and report["chat_template_ids_equal"] and report.get("modelfile_ids_equal", True))
    return report
