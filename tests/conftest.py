"""Shared fixtures: a byte-level BPE tokenizer trained in-process on the project's data, and a tiny llama."""
import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Encoded-dataset caches of the tests stay out of the user's HF cache (set before `datasets` is imported).
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="sft-test-cache-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
# No chat.py or eval.py a test starts builds a compiled decode step in the background (minutes of CPU each);
# tests/test_decode_step.py builds one where it is the subject.
os.environ["DECODE_STEP_CACHE"] = "off"

# The test files that take 6 s or more of a worker's time, longest first, run first: `make test` hands files to its
# two workers in collection order, and a long one handed out last leaves the other worker idle for its length (with
# only the seven longest first, test_preference and test_web came last: the workers ended 18 s apart). The order is a
# fresh clone's on a fresh machine, as CI runs it (2026-12-07, 2-core EPYC, nothing cached: 104, 91, 74, 61, 56, ~50,
# 41, 29, 22, 19, 14, 12, 11, 10, 10, 9 s); with the compiler's caches warm the package build takes half as long.
SLOW_FILES = ("test_decode_step.py", "test_train.py", "test_distributed.py", "test_gguf.py", "test_serve.py",
              "test_bench.py", "test_judging.py", "test_web.py", "test_preference.py", "test_merge.py", "test_fuzz.py",
              "test_benchmarks.py", "test_convert.py", "test_chat.py", "test_grpo.py", "test_trackers.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: the rest as collected


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def _corpus():
    for record in json.loads((ROOT / "data" / "psych_sample.json").read_text(encoding="utf-8")):
        for turn in record["conversation"]:
            yield turn.get("system") or ""
            yield turn["input"]
            yield turn["output"]


def build_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer random llama with the in-process tokenizer, saved as an HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Eight counselling conversations: enough rows for a few steps, fast to encode (test_train, test_distributed)."""
    records = json.loads((ROOT / "data" / "psych_sample.json").read_text(encoding="utf-8"))[:8]
    path = tmp_path_factory.mktemp("data") / "sample.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path
