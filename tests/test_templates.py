"""Templates reproduce XTuner's prompt formats and encoding, token for token."""
import json
from pathlib import Path

import pytest

from common.conversation import Turn, turns_to_messages
from common.templates import IGNORE, SYSTEM_TEMPLATES, TEMPLATES, TOKENIZER, get_template

# XTuner's PROMPT_TEMPLATE and SYSTEM_TEMPLATE tables, copied from ../shared/reference/prompt_templates.json so that
# the comparison runs in every checkout; where ../shared exists, the copy is checked against it.
REFERENCE = Path(__file__).resolve().parent / "fixtures" / "xtuner_prompt_templates.json"
SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "prompt_templates.json"

CONVERSATION = [
    Turn("我最近总是失眠", "我能理解你的困扰。能说说通常几点睡吗？", system="你是一位心理咨询师"),
    Turn("一般凌晨两点", "这确实很晚了。我们可以先从固定起床时间开始。"),
    Turn("好的，谢谢", "不客气，有需要随时来聊。"),
]


def xtuner_reference(tokenizer, spec: dict, turns):
    """XTuner 0.2's template_map_fn + encode_fn, written from its source's logic over the raw JSON fields."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids, labels, next_bos = [], [], True
    for i, turn in enumerate(turns):
        text = spec["INSTRUCTION"].format(input=turn.input, round=i + 1)
        if turn.system:
            text = spec["SYSTEM"].format(system=turn.system) + text
        output = turn.output + spec.get("SUFFIX", "")
        enc_in = tokenizer.encode(text, add_special_tokens=False)
        if next_bos:
            ids += bos
            labels += [IGNORE] * len(bos)
        ids += enc_in
        labels += [IGNORE] * len(enc_in)
        enc_out = tokenizer.encode(output, add_special_tokens=False)
        ids += enc_out
        labels += enc_out
        if not spec.get("SUFFIX_AS_EOS", False):
            next_bos = True
            ids += [tokenizer.eos_token_id]
            labels += [tokenizer.eos_token_id]
        else:
            next_bos = False
        if spec.get("SEP", ""):
            enc_sep = tokenizer.encode(spec["SEP"], add_special_tokens=False)
            ids += enc_sep
            labels += [IGNORE] * len(enc_sep)
    return ids, labels


def test_table_equals_reference():
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert len(TEMPLATES) == 27 and set(TEMPLATES) == set(reference["PROMPT_TEMPLATE"])
    for name, spec in reference["PROMPT_TEMPLATE"].items():
        t = TEMPLATES[name]
        assert (t.instruction, t.system, t.suffix, t.suffix_as_eos, t.sep, list(t.own_stop_words())) == (
            spec["INSTRUCTION"], spec.get("SYSTEM"), spec.get("SUFFIX", ""), spec.get("SUFFIX_AS_EOS", False),
            spec.get("SEP", ""), spec.get("STOP_WORDS", []))
    assert SYSTEM_TEMPLATES == reference["SYSTEM_TEMPLATE"]


def test_the_reference_copy_is_the_shared_one():
    if not SHARED_REFERENCE.exists():
        pytest.skip("../shared/reference is not beside this checkout: the copy in tests/fixtures stands alone")
    assert REFERENCE.read_bytes() == SHARED_REFERENCE.read_bytes()


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_matches_xtuner_encoding(tokenizer, name):
    t = TEMPLATES[name]
    spec = {"INSTRUCTION": t.instruction, "SYSTEM": t.system or "", "SUFFIX": t.suffix,
            "SUFFIX_AS_EOS": t.suffix_as_eos, "SEP": t.sep}
    turns = CONVERSATION if t.system else [Turn(x.input, x.output) for x in CONVERSATION]
    assert t.encode_ids(tokenizer, turns) == xtuner_reference(tokenizer, spec, turns)


def test_qwen_chat_text_and_mask(tokenizer):
    ids, labels = TEMPLATES["qwen_chat"].encode_ids(tokenizer, CONVERSATION[:2])
    assert tokenizer.decode(ids) == (
        "<s><|im_start|>system\n你是一位心理咨询师<|im_end|>\n<|im_start|>user\n我最近总是失眠<|im_end|>\n"
        "<|im_start|>assistant\n我能理解你的困扰。能说说通常几点睡吗？<|im_end|>\n"
        "<|im_start|>user\n一般凌晨两点<|im_end|>\n<|im_start|>assistant\n这确实很晚了。我们可以先从固定起床时间开始。<|im_end|>\n")
    trained = tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert trained == "我能理解你的困扰。能说说通常几点睡吗？<|im_end|>这确实很晚了。我们可以先从固定起床时间开始。<|im_end|>"


def test_eos_and_bos_between_turns_when_suffix_is_not_eos(tokenizer):
    # llama2_chat has no SUFFIX and SUFFIX_AS_EOS false: EOS after each answer (trained), BOS again after it.
    ids, labels = TEMPLATES["llama2_chat"].encode_ids(tokenizer, CONVERSATION[:2])
    text = tokenizer.decode(ids)
    assert text.count("<s>") == 2 and text.count("</s>") == 2
    assert text.startswith("<s>[INST] <<SYS>>\n") and "[/INST]我能理解" in text
    eos_positions = [n for n, i in enumerate(ids) if i == tokenizer.eos_token_id]
    assert all(labels[n] == tokenizer.eos_token_id for n in eos_positions)


def test_chatglm2_round_numbers(tokenizer):
    ids, _ = TEMPLATES["chatglm2"].encode_ids(tokenizer, CONVERSATION)
    text = tokenizer.decode(ids)
    assert "[Round 1]\n\n问：我最近总是失眠" in text and "[Round 3]\n\n问：好的，谢谢" in text


def test_untrained_turn_and_no_bos_tokenizer(tokenizer):
    turns = [Turn("a", "b", train=False), Turn("c", "d")]
    ids, labels = TEMPLATES["qwen_chat"].encode_ids(tokenizer, turns)
    assert tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == "d<|im_end|>"
    old = tokenizer.bos_token
    try:
        tokenizer.bos_token = None  # Qwen tokenizers have no BOS: nothing is prepended
        ids2, _ = TEMPLATES["qwen_chat"].encode_ids(tokenizer, turns)
    finally:
        tokenizer.bos_token = old
    assert ids2 == ids[1:]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_chat_template_renders_the_training_text(tokenizer, name):
    t = TEMPLATES[name]
    turns = CONVERSATION if t.system else [Turn(x.input, x.output) for x in CONVERSATION]
    ids, _ = t.encode_ids(tokenizer, turns)
    rendered = tokenizer.apply_chat_template(turns_to_messages(turns), tokenize=False, chat_template=t.chat_template(tokenizer))
    assert rendered == tokenizer.decode(ids)


def test_generation_prompt_is_prefix_of_training_encoding(tokenizer):
    for template in [TEMPLATES["qwen_chat"], TEMPLATES["llama2_chat"], get_template("tokenizer")]:
        full, _ = template.encode_ids(tokenizer, CONVERSATION)
        prompt, _ = template.encode_ids(tokenizer, CONVERSATION[:2] + [Turn(CONVERSATION[2].input, None)])
        assert full[: len(prompt)] == prompt


def test_tokenizer_template_mask_from_growing_prefixes(tokenizer):
    segments = TOKENIZER.encode(tokenizer, CONVERSATION[:2])
    assert len(segments) == 2
    texts = [tokenizer.decode(s[0]) for s in segments]
    assert texts[0].startswith("<|im_start|>system\n你是一位心理咨询师<|im_end|>\n<|im_start|>user\n")
    assert texts[1].startswith("<|im_start|>user\n一般凌晨两点")
    trained = [tokenizer.decode([i for i, lab in zip(*s) if lab != IGNORE]) for s in segments]
    assert trained == ["我能理解你的困扰。能说说通常几点睡吗？<|im_end|>", "这确实很晚了。我们可以先从固定起床时间开始。<|im_end|>"]


def test_tokenizer_template_that_rewrites_history_is_refused(tokenizer):
    from common.cli import UserError

    # A template that only shows the last user message: prefixes do not extend each other.
    rewriting = "{{ messages[-1]['content'] }}"
    old = tokenizer.chat_template
    tokenizer.chat_template = rewriting
    try:
        with pytest.raises(UserError, match="extension of the earlier turns|prefix"):
            TOKENIZER.encode(tokenizer, CONVERSATION)
    finally:
        tokenizer.chat_template = old


def test_the_encode_cache_is_bounded_by_size(tokenizer):
    """Distinct prompts (a server's, refused ones too) must not grow memory without bound: the cache keeps a budget of
    characters + ids, skips pieces too big to be worth keeping, and still answers repeated pieces from memory."""
    from common.templates import EncodeCache

    cache = EncodeCache(budget=20_000)
    for i in range(200):
        text = f"{i} 我最近很焦虑，晚上睡不着。" * 10
        assert list(cache.encode(tokenizer, text)) == tokenizer.encode(text, add_special_tokens=False)
        assert cache.used <= cache.budget
    assert 0 < len(cache.entries) < 200
    cache.encode(tokenizer, "x" * 10_000)  # over budget/8: encoded, not kept
    assert all(len(text) < 10_000 for _, text in cache.entries)
    last = next(reversed(cache.entries))
    assert cache.encode(tokenizer, last[1]) is cache.entries[last]  # a hit returns the kept ids
