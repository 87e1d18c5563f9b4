"""The compiled decode step (common/decode_step.py): built by the real background process, loaded with the live
model's tensors, and answering as the eager step answers; a package that does not fit, or is damaged, is refused
with a warning and decoding goes on eagerly.

The model is the tiny random llama of test_decoding (weights ten times the usual scale, so positions and the cache
matter: a compiled step that mishandled either would answer differently) with a LoRA adapter whose B matrices are
not zero, split products on: the structure of a tuned run as chat.py loads it. One build (~30 s) serves the module.
"""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from common import decode_step
from common.decoding import Decoder, Row, split_products
from common.generation import Generator, Sampling
from common.templates import get_template
from tests.test_decoding import assert_as_alone

BUILD_TIMEOUT = 300  # seconds: a tiny model builds in ~30 s on 2 cores


def tuned_model(tokenizer, **config):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **config)
    model = LlamaForCausalLM(config).eval()
    split_products(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # PEFT starts B at zero: an adapter that does nothing tests nothing
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tuned_model(tokenizer)


@pytest.fixture(scope="module")
def root(tmp_path_factory, model):
    """A package cache where the model's package was built by the background process chat.py starts."""
    root = tmp_path_factory.mktemp("decode_steps")
    fast = decode_step.FastStep.for_model(model, build=True, root=root)
    assert fast is not None and (root / f"{fast.key}.lock").exists()
    # A second process asking while the build is under way does not start another
    assert decode_step.start_build(root, fast.key, fast.spec, {}) is None
    built = fast.wait_for_build(BUILD_TIMEOUT)
    log = (root / f"{fast.key}.log").read_text(encoding="utf-8", errors="replace")
    assert built and not (root / f"{fast.key}.lock").exists(), f"no package; the build's log ends: {log[-2000:]}"
    assert json.loads((root / fast.key / decode_step.SPEC).read_text()) == json.loads(json.dumps(fast.spec))
    assert not list(root.glob("*.failed")) and not list(root.glob(".*tmp*"))
    return root


def answer(model, prompt, fast=None, **row):
    r = Row(list(prompt), row.pop("max_new_tokens", 40), frozenset(), **row)
    Decoder(model, fast=fast).run(r)
    return r.answer


PROMPTS = [[5, 9, 17, 33], list(range(40, 140))]  # short, and longer than the example the step was traced with


def test_answers_through_the_compiled_step_are_the_eager_answers(model, root, tokenizer):
    fast = decode_step.FastStep.for_model(model, build=False, root=root)
    assert fast.ready()
    for prompt in PROMPTS:
        assert answer(model, prompt, fast) == answer(model, prompt)
    assert fast.verified and fast.off is None
    assert fast.steps == 2 * 39 - 1  # every step after the first answer's first (checked against eager) was compiled
    # Sampling with a seed draws the same tokens: the logits are the same up to the last bits
    generator = Generator(model, tokenizer, get_template("qwen_chat"), max_length=1024)
    for seed in (1, 2):
        sampling = Sampling(max_new_tokens=30, temperature=0.8, top_k=20, top_p=0.9, seed=seed)
        rows = [generator.start([{"role": "user", "content": "我最近很焦虑，晚上睡不着。"}], sampling).row
                for _ in range(2)]
        Decoder(model, fast=fast).run(rows[0])
        Decoder(model).run(rows[1])
        assert rows[0].answer == rows[1].answer and len(rows[0].answer) == 30


def test_logits_of_the_compiled_step_match_the_model(model, root):
    """Each compiled step, teacher-forced along a prompt, against one forward of the whole prompt without a cache; the
    steps write into the cache's buffers in place, and a full buffer is replaced by a larger one, its cache kept."""
    fast = decode_step.FastStep.for_model(model, build=False, root=root)
    assert fast.ready()
    tokens = PROMPTS[1]
    with torch.inference_mode():
        whole = model(input_ids=torch.tensor([tokens])).logits[0].float()
        decoder = Decoder(model, fast=fast)
        decoder.add(Row(tokens[:50], 100, frozenset()))
        buffers = []
        for position in range(50, 99):
            if position == 51:  # after the checked first step: buffers with room for one more position only
                for layer in decoder.cache.layers:
                    layer.keys = decode_step.with_room(layer.keys, 52)[:, :, :51]
                    layer.values = decode_step.with_room(layer.values, 52)[:, :, :51]
            ids, positions = torch.tensor([[tokens[position]]]), torch.tensor([[position]])
            logits = fast.step(ids, positions, decoder.cache, eager=lambda: model(
                input_ids=ids, position_ids=positions, cache=decoder.cache, use_cache=True).logits[:, -1])
            assert torch.allclose(logits[0].float(), whole[position], atol=1e-4, rtol=0), position
            keys = decoder.cache.layers[0].keys
            assert keys.shape[2] == position + 1
            buffers.append((keys.untyped_storage().data_ptr(), keys.stride(1) // keys.shape[3]))
    assert fast.verified and fast.steps == 48
    # position 51 filled the buffer of 52, 52 moved to one of 52 + 256 that every later step wrote into
    assert buffers[1][1] == 52 and buffers[2][1] == 53 + 256 and buffers[1][0] != buffers[2][0]
    assert len(set(buffers[2:])) == 1


@pytest.fixture
def operators(model, root):
    """The packages' own operators (common/decode_kernels.cpp) loaded in this process; the folder of the package
    that holds them. Skipped where they do not apply (a CPU without AVX2)."""
    fast = decode_step.FastStep.for_model(model, build=False, root=root)
    assert fast.ready()
    if not decode_step.uses_kernel(fast.spec):
        pytest.skip(f"the operators are AVX2's; this CPU dispatches to {fast.spec['cpu_capability']}")
    return root / fast.key


def test_products_in_blocks_are_the_layers_products(model, operators):
    """The batch step's products as traced (products_in_blocks), run eagerly through the operator the build compiled
    (common/decode_kernels.cpp): a weight in blocks, its output count not a multiple of the block (the padding cut
    off), gives F.linear's rows for every number of rows (the operator takes them four at a time, then the rest);
    the model's layers and its LM head are taken in blocks, an adapter's halves are not (rank 4, nor 16: the
    optimizer rewrites them)."""
    assert (operators / decode_step.KERNEL).is_file()
    torch.manual_seed(0)
    block = decode_step.BLOCK
    layer = torch.nn.Linear(40, 2 * block + 5)
    weight = decode_step.blocked(layer.weight)
    assert weight.shape == (3, 40, block) and weight.is_contiguous()
    assert torch.equal(weight[1, :, 2], layer.weight[block + 2]) and not weight[2, :, 5:].any()
    layer.blocks = weight
    for rows in range(1, 10):
        x = torch.randn(rows, 1, 40)
        assert torch.allclose(decode_step._blocks_forward(layer, x), layer(x), atol=1e-6)
    names = [name for name, _ in decode_step.blocked_linears(model)]
    assert "base_model.model.lm_head" in names and "base_model.model.model.layers.1.mlp.down_proj.base_layer" in names
    assert len(names) == 2 * 7 + 1 and not any("lora" in name for name in names)
    wide = get_peft_model(LlamaForCausalLM(model.config), LoraConfig(r=16, target_modules=["q_proj"]))
    names = [name for name, _ in decode_step.blocked_linears(wide)]
    assert len(names) == 2 * 7 + 1 and not any("lora" in name for name in names)


def test_the_traced_attention_is_the_models_and_refuses_what_it_does_not_do():
    """The attention the build traces (query heads grouped by the key/value head they share, the cache not repeated;
    a lone row's without a mask, a batch's with each row's padding masked) against transformers' own for one
    query over a grouped cache; an argument it would ignore (logit softcapping, attention sinks, a sliding window)
    fails the build instead of compiling something else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 9, 1, 16), torch.randn(2, 3, 37, 16), torch.randn(2, 3, 37, 16)
    mine, _ = decode_step.one_query_attention(module, query, key, value, None, scaling=0.25, use_cache=True,
                                              position_ids=torch.tensor([[36], [36]]), sliding_window=None)
    theirs, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.25)
    assert mine.shape == theirs.shape == (2, 1, 9, 16)
    assert torch.allclose(mine, theirs, atol=1e-6, rtol=0)
    padding = torch.tensor([[5], [0]])  # the first row's first 5 positions are padding
    mask = (torch.arange(37) >= padding)[:, None, None, :]
    for scaling in (0.25, None):
        mine, _ = decode_step.one_query_attention(module, query, key, value, mask, scaling=scaling)
        theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)
        assert torch.allclose(mine, theirs, atol=1e-6, rtol=0)
    alone, _ = sdpa_attention_forward(module, query[:1], key[:1, :, 5:], value[:1, :, 5:], None, scaling=0.25)
    unmasked, masked = (decode_step.one_query_attention(module, query, key, value, given, scaling=0.25)[0][:1]
                        for given in (None, mask))  # the padded row: its padding seen, and hidden
    assert not torch.allclose(alone, unmasked) and torch.allclose(alone, masked, atol=1e-6, rtol=0)
    for name, given in (("softcap", 30.0), ("s_aux", torch.zeros(9)), ("sliding_window", 16)):
        with pytest.raises(NotImplementedError, match=name):
            decode_step.one_query_attention(module, query, key, value, None, scaling=0.25, **{name: given})


def test_our_attention_operator_is_sdpas(operators):
    """The attention operator the packages call (common/decode_kernels.cpp, loaded with them) against transformers'
    SDPA attention: three query heads per key/value head, each row's left padding hidden, for a head dim of 16 (the
    tiny model's) and of 64 (SmolLM2's), over the cache buffers' strides."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    torch.manual_seed(0)
    for dim in (16, 64):
        query = torch.randn(2, 9, 1, dim)
        key, value = (torch.randn(2, 3, 50, dim).narrow(2, 0, 37) for _ in range(2))  # buffers with room
        padding = torch.tensor([[5], [0]])
        mask = (torch.arange(37) >= padding)[:, None, None, :]
        grouped = query.reshape(2, 3, 3, dim)
        for given, hidden in ((mask, padding), (None, torch.zeros(2, 1, dtype=torch.long))):
            ours = torch.ops.decode_step.one_query_attention(grouped, key, value, hidden, 0.25)
            theirs, _ = sdpa_attention_forward(module, query, key, value, given, scaling=0.25)
            assert torch.allclose(ours.reshape(2, 9, 1, dim).transpose(1, 2), theirs, atol=1e-6, rtol=0)


def test_a_package_of_another_structure_is_refused_and_decoding_goes_on(model, root, tokenizer, capsys):
    other = tuned_model(tokenizer, rms_norm_eps=0.5)  # same tensors and names, a different computation
    fast = decode_step.FastStep.for_model(other, build=False, root=root)
    assert fast.key != decode_step.FastStep.for_model(model, build=False, root=root).key
    shutil.copytree(root / decode_step.key(decode_step.structure(model)), root / fast.key)
    assert fast.ready()  # it loads: the names and shapes fit
    assert answer(other, PROMPTS[0], fast) == answer(other, PROMPTS[0])
    assert fast.off and "differ" in fast.off and fast.steps == 0
    assert "warning: the compiled decode step is not used" in capsys.readouterr().err
    assert not fast.ready()


def test_a_damaged_package_is_refused_and_decoding_goes_on(model, root, tokenizer, capsys):
    other = tuned_model(tokenizer, rope_theta=500.0)
    fast = decode_step.FastStep.for_model(other, build=False, root=root)
    (root / fast.key).mkdir()
    (root / fast.key / decode_step.PACKAGE).write_bytes(b"PK\x03\x04 not a package")
    assert not fast.ready()
    assert "could not be loaded" in fast.off
    assert capsys.readouterr().err.count("\n") == 1  # one line
    assert answer(other, PROMPTS[0], fast) == answer(other, PROMPTS[0])


def test_released_packages_leave_no_copies_in_the_temp_folder_and_decoding_goes_on(model, root, tmp_path,
                                                                                   monkeypatch):
    """A loaded package keeps an extracted copy of itself in the temp folder until it is freed; release() (a server's
    exit) frees both packages, copies and all, and answers go on eagerly."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the packages' loader extracts them
    fast = decode_step.FastStep.for_model(model, build=False, root=root)
    assert fast.ready() and len(list(tmp_path.glob("aotinductor_*"))) == 2  # the lone package and the batch's
    fast.release()
    assert not list(tmp_path.glob("aotinductor_*"))
    assert not fast.ready() and fast.off == "released"
    assert answer(model, PROMPTS[0], fast) == answer(model, PROMPTS[0]) and fast.steps == 0


def test_a_failed_build_is_not_retried_and_said_once(model, tmp_path, capsys):
    fast = decode_step.FastStep.for_model(model, build=False, root=tmp_path)
    failed = tmp_path / f"{fast.key}.failed"
    failed.write_text("RuntimeError: it failed\n")
    assert decode_step.start_build(tmp_path, fast.key, fast.spec, {}) is None
    assert not (tmp_path / f"{fast.key}.lock").exists()
    for _ in range(2):  # a REPL or server that starts: one note naming the marker and how to retry, once a process
        assert decode_step.FastStep.for_model(model, build=True, root=tmp_path) is not None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: it failed" in err and f"Delete {failed} to try again" in err
    assert not (tmp_path / f"{fast.key}.lock").exists()


def test_the_key_holds_the_cpu_capability_and_the_build_code(model):
    """A package compiled for one instruction set is never looked for on a machine of another (an AVX-512 package
    on an AVX2 node dies of an illegal instruction); the code that builds packages is in the key, not a number."""
    import torch

    here = decode_step.structure(model)
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    keys = {decode_step.key(decode_step.structure(model, cpu_capability=isa)) for isa in ("DEFAULT", "AVX2", "AVX512")}
    assert len(keys) == 3
    assert decode_step.key(here) in keys
    assert here["build"] == decode_step.build_code() and len(here["build"]) == 16
    changed = dict(here, build=decode_step.build_code() + "0")  # what a change to the build's source does
    assert decode_step.key(changed) != decode_step.key(here)


def test_the_base_decodes_eagerly(model, root, tokenizer):
    """The adapter switched off is another computation than the package's: eager."""
    fast = decode_step.FastStep.for_model(model, build=False, root=root)
    generator = Generator(model, tokenizer, get_template("qwen_chat"), max_length=1024, fast=fast)
    assert generator.decoder(adapter=False).fast is None and generator.decoder().fast is fast


def test_a_batch_through_the_compiled_step_answers_as_each_row_alone(model, root, tokenizer):
    """The batch package: rows of different prompt lengths join and leave mid-answer (the others' cache padded,
    trimmed and copied into new buffers each time), one with a repetition penalty, one sampled with a seed. Every
    greedy token is what the row's own eager forward, alone, picks (up to rounding); the seeded row draws what it
    draws decoded alone and eagerly."""
    fast = decode_step.FastStep.for_model(model, build=False, root=root)
    assert fast.ready()
    generator = Generator(model, tokenizer, get_template("qwen_chat"), max_length=1024, fast=fast)

    def start(question, **sampling):
        return generator.start([{"role": "user", "content": question}], Sampling(**sampling)).row

    short = start("你好", max_new_tokens=6)
    long = start("我最近很焦虑，晚上睡不着，白天也没有精神，怎么办？" * 3, max_new_tokens=12)
    penalised = start("我和父母总是吵架。", max_new_tokens=30, repetition_penalty=1.3)
    seeded = start("我最近很焦虑。", max_new_tokens=20, temperature=0.8, top_k=20, seed=3)
    decoder, ended = generator.decoder(), []
    for row, steps in ((short, 3), (long, 2), (penalised, 4), (seeded, 0)):
        assert not decoder.add(row)
        for _ in range(steps):
            ended += decoder.step()
    assert decoder.padded and decoder.rows == [long, penalised, seeded]
    for _ in range(100):
        if not decoder.rows:
            break
        ended += decoder.step()
    assert ended == [short, long, seeded, penalised] and all(r.ended == "length" for r in ended)
    assert fast.batch_steps == 24 and fast.off is None  # 25 steps of 2-3 rows, the first checked against eager
    # the layers' weights in blocks, made at the first batch step (where the products operator applies)
    assert len(fast.blocks) == (2 * 7 + 1 if decode_step.uses_kernel(fast.spec) else 0)
    for row in (short, long, penalised):
        assert_as_alone(model, row)
    alone = start("我最近很焦虑。", max_new_tokens=20, temperature=0.8, top_k=20, seed=3)
    Decoder(model).run(alone)
    assert seeded.answer == alone.answer


def test_a_lone_answer_that_joins_a_batch_and_leaves_it_answers_as_eager(model, root):
    """The server's normal life: an answer decoding alone (the lone package) is joined by another mid-answer (the
    batch package, its cache padded and copied out of the lone step's buffers), which ends first; the first answer
    is alone again and back on the lone package. Both answers are the eager answers token for token."""
    fast = decode_step.FastStep.for_model(model, build=False, root=root)
    assert fast.ready()
    decoder = Decoder(model, fast=fast)
    first, second = Row(PROMPTS[1], 40, frozenset()), Row(PROMPTS[0], 10, frozenset())
    assert not decoder.add(first)
    for _ in range(12):
        decoder.step()
    alone_before = fast.steps
    assert alone_before >= 10  # compiled while alone (the first step of a process may be the checked one)
    assert not decoder.add(second)
    while second in decoder.rows:
        decoder.step()
    assert fast.steps == alone_before and len(decoder.rows) == 1 and not decoder.padded
    assert fast.batch_steps > 0  # the two rows took the batch package
    while decoder.rows:
        decoder.step()
    assert fast.steps > alone_before  # alone again: compiled again
    assert first.answer == answer(model, PROMPTS[1]) and len(first.answer) == 40
    assert second.answer == answer(model, PROMPTS[0], max_new_tokens=10)


def test_a_weight_changed_in_place_is_taken_in_blocks_again(model, root):
    """A full fine-tune's optimizer writes the weights between GRPO's rollouts: the batch step copies a weight changed
    in place (its tensor's version moved) into blocks again, and answers as the eager batch does with the new one."""
    fast = decode_step.FastStep.for_model(model, build=False, root=root)
    assert fast.ready()
    weight = model.get_parameter("base_model.model.model.layers.0.mlp.down_proj.base_layer.weight")
    kept = weight.detach().clone()

    def answers():
        compiled, eager = ([Row(list(prompt), 12, frozenset()) for prompt in PROMPTS] for _ in range(2))
        for rows, fast_ in ((compiled, fast), (eager, None)):
            decoder = Decoder(model, fast=fast_)
            for row in rows:
                decoder.add(row)
            while decoder.rows:
                decoder.step()
        return [row.answer for row in compiled], [row.answer for row in eager]

    try:
        before, _ = answers()
        with torch.no_grad():
            weight.mul_(-1)
        compiled, eager = answers()
        assert compiled == eager and compiled != before and fast.batch_steps > 0 and fast.off is None
    finally:
        with torch.no_grad():
            weight.copy_(kept)


def test_the_switch_turns_it_off(model):
    env = os.environ.get(decode_step.CACHE_ENV)
    assert env == "off"  # tests/conftest.py: no test process builds in the background unless it asks
    assert decode_step.FastStep.for_model(model, build=True) is None


def test_an_unwritable_cache_is_one_warning(model, tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    fast = decode_step.FastStep.for_model(model, build=True, root=blocked / "steps")
    assert fast is not None and not fast.ready()
    err = capsys.readouterr().err
    assert err.startswith("warning: the compiled decode step cannot be built in") and err.count("\n") == 1


def test_grpo_rollouts_sample_a_group_through_the_batch_package(model, root, tokenizer, monkeypatch):
    """GRPO's rollout (common/grpo.py) takes the model's compiled step in training mode when no dropout is active:
    a group's rows (one prompt prefilled once, its cache shared) step through the batch package and draw, seeded,
    what each draws alone and eagerly. With a LoRA dropout active it decodes eagerly (the package has none)."""
    from common.grpo import Rollout

    monkeypatch.setenv(decode_step.CACHE_ENV, str(root))  # the switch: where packages live
    rollout = Rollout(tokenizer, get_template("qwen_chat"), fast=True)
    model.train()
    try:
        fast = rollout.compiled_step(model)
        assert fast is not None and fast.ready() and rollout.compiled_step(model) is fast
        before = fast.batch_steps
        group = [Row(PROMPTS[1], 16, frozenset(), greedy=False, seed=seed) for seed in range(4)]
        decoder = Decoder(model, fast=fast)
        assert decoder.add_alike(group) == group
        while decoder.rows:
            decoder.step()
        assert fast.batch_steps - before >= 14 and fast.off is None
        for row in group:
            alone = Row(PROMPTS[1], 16, frozenset(), greedy=False, seed=row.seed)
            Decoder(model).run(alone)
            assert row.answer == alone.answer
    finally:
        model.eval()
    dropping = get_peft_model(LlamaForCausalLM(model.config),
                              LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    assert Rollout(tokenizer, None, fast=True).compiled_step(dropping.train()) is None
