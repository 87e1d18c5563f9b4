"""The decoder (common/decoding.py) batches rows that join at different times, with prompts of different lengths and
their own settings, and each row gets the tokens it would get alone.

The model is a tiny random llama with larger weights (initializer_range 0.2, ten times the usual): its attention
depends on positions and masks, so a wrong position id, a missing padding mask or a bad cache merge changes the
answer (each was tried: the first test fails), where with the usual small weights attention is nearly uniform and
hides such errors. The check teacher-forces each batched answer through the model alone (one forward over
prompt + answer: no cache, no padding, no batch) and requires every greedy token to be that forward's top token up to
float rounding: within TOLERANCE of the top score (near-ties that the rounding of batched matrix products may flip).
Exact equality under load is checked on the real model (test_serve's demo tests).
"""
import pytest
import torch

from transformers import LlamaConfig, LlamaForCausalLM

from common.decoding import HELD_APART, Decoder, PromptCache, Row, common_prefix, held_alike, split_products
from common.generation import Generator, Sampling
from common.templates import get_template

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def generator(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    return Generator(model, tokenizer, get_template("qwen_chat"), max_length=1024)


def start(generator, question, **sampling):
    return generator.start([{"role": "user", "content": question}], Sampling(**sampling))


def assert_as_alone(model, row) -> None:
    """Every token of the row's answer is what its own forward, alone, would pick (up to rounding)."""
    ids = torch.tensor([row.prompt + row.answer])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(row.prompt) - 1:-1].float()
    assert len(logits) == len(row.answer) > 0
    for i, (token, scores) in enumerate(zip(row.answer, logits)):
        if row.processors:  # the row's own processors (repetition penalty) on the ids it had seen
            scores = row.processors(torch.tensor([row.prompt + row.answer[:i]]), scores[None])[0]
        assert scores[token] >= scores.max() - TOLERANCE, f"answer token {i}: {token} is not the top token alone"


def test_rows_joining_and_leaving_at_different_times_answer_as_alone(generator):
    model = generator.model
    short = start(generator, "你好", max_new_tokens=6)
    long = start(generator, "我最近很焦虑，晚上睡不着，白天也没有精神，怎么办？" * 3, max_new_tokens=10)
    penalised = start(generator, "我和父母总是吵架。", max_new_tokens=30, repetition_penalty=1.3)
    assert len(short.row.prompt) < len(penalised.row.prompt) < len(long.row.prompt)
    decoder = Decoder(model)
    ended = []
    assert not decoder.add(short.row)
    for _ in range(3):
        ended += decoder.step()
    assert not decoder.add(long.row)  # a longer prompt joins: the rows under way are padded on the left
    assert decoder.padded and decoder.mask.shape == (2, len(long.row.prompt))
    for _ in range(2):
        ended += decoder.step()
    assert not decoder.add(penalised.row)
    for _ in range(200):
        if not decoder.rows:
            break
        ended += decoder.step()
        if decoder.rows == [penalised.row]:  # the others have left, and the padding columns with them
            row = penalised.row
            assert not decoder.padded
            assert decoder.mask.shape[1] == decoder.cache.get_seq_length() == len(row.prompt) + len(row.answer) - 1
    assert ended == [short.row, long.row, penalised.row]
    assert [len(r.answer) for r in ended] == [6, 10, 30] and all(r.ended == "length" for r in ended)
    for row in ended:
        assert_as_alone(model, row)


def test_a_long_prompt_joining_rows_under_way_is_prefilled_a_chunk_per_step(generator):
    """The server's chunked prefill: a prompt longer than `chunk` that joins a row under way takes one chunk per
    step, the row under way getting a token at each of them; it joins after its last chunk, and both answer as alone.
    A prompt that fits one chunk, or one joining an idle decoder, is prefilled whole at once."""
    model = generator.model
    under_way = start(generator, "你好", max_new_tokens=20)
    long = start(generator, "我最近很焦虑，晚上睡不着，白天也没有精神，怎么办？" * 3, max_new_tokens=8)
    chunk = 16
    chunks = -(-len(long.row.prompt) // chunk)
    assert chunks >= 3
    decoder = Decoder(model)
    assert not decoder.add(under_way.row, chunk=chunk)  # an idle decoder: prefilled whole, it joins at once
    assert decoder.rows == [under_way.row] and len(under_way.row.answer) == 1
    assert not decoder.add(long.row, chunk=chunk)
    assert decoder.rows == [under_way.row] and decoder.in_flight == [under_way.row, long.row]
    for i in range(1, chunks):
        assert decoder.step() == [] and not long.row.answer  # a chunk in, and a token for the row under way
        assert len(under_way.row.answer) == 1 + i and decoder.prefills[0].done == i * chunk
    decoder.step()  # the last chunk: its first token, it joins, and the batch step gives it a second
    assert decoder.rows == [under_way.row, long.row] and len(long.row.answer) == 2 and not decoder.prefills
    ended = []
    while decoder.rows:
        ended += decoder.step()
    assert ended == [long.row, under_way.row]
    for row in ended:
        assert_as_alone(model, row)
    short = start(generator, "你好", max_new_tokens=2)
    fits = Decoder(model)
    fits.add(start(generator, "我和父母总是吵架。", max_new_tokens=4).row)
    assert not fits.add(short.row, chunk=len(short.row.prompt)) and short.row.answer  # one chunk: prefilled at once


def test_prompts_being_prefilled_outlive_the_last_row_leaving(generator):
    """The rows under way all end while two long prompts wait, chunked: the prompts stay, and with nobody decoding
    the first one's rest is prefilled whole at the next step; both answer as alone."""
    decoder = Decoder(generator.model)
    decoder.add(start(generator, "你好", max_new_tokens=2).row)
    waiting = [start(generator, "我最近很焦虑，晚上睡不着，白天也没有精神，怎么办？" * 3, max_new_tokens=6)
               for _ in range(2)]
    chunk = len(waiting[0].row.prompt) // 3
    for answering in waiting:
        assert not decoder.add(answering.row, chunk=chunk)
    assert len(decoder.step()) == 1 and not decoder.rows  # the short answer ends: the batch is empty
    assert [p.done for p in decoder.prefills] == [chunk, 0]
    decoder.step()  # no row decoding: the first prompt's rest at once; it joins and steps
    assert decoder.rows == [waiting[0].row] and [p.done for p in decoder.prefills] == [0]
    ended = []
    while decoder.in_flight:
        ended += decoder.step()
    assert ended == [w.row for w in waiting]
    for answering in waiting:
        assert_as_alone(generator.model, answering.row)


def test_a_prompt_whose_first_token_ends_it_leaves_from_the_step_that_prefilled_it(generator):
    """A chunked prompt whose answer ends at its first token (max_new_tokens 1) never joins the batch: the step that
    prefills its last chunk returns it. A failure mid-prefill empties the decoder, prompts being prefilled too."""
    decoder = Decoder(generator.model)
    decoder.add(start(generator, "你好", max_new_tokens=10).row)
    one = start(generator, "我最近很焦虑，晚上睡不着，白天也没有精神，怎么办？" * 2, max_new_tokens=1)
    assert not decoder.add(one.row, chunk=len(one.row.prompt) - 1)
    assert decoder.step() == []
    assert decoder.step() == [one.row] and one.row.ended == "length" and len(decoder.rows) == 1
    broken = start(generator, "我最近很焦虑，晚上睡不着，白天也没有精神，怎么办？" * 2, max_new_tokens=4)
    broken.row.prompt[-1] = 10 ** 6  # not a token of this model: the last chunk's forward fails
    decoder.add(broken.row, chunk=len(broken.row.prompt) - 1)
    decoder.step()
    with pytest.raises(IndexError):
        decoder.step()
    assert decoder.in_flight == [] and decoder.cache is None


def test_a_lone_row_is_decoded_as_generate_decodes_it(generator):
    """One row alone (the REPL's case) has no padding and no batch: the same tokens as generate(), exactly."""
    answering = start(generator, "我最近很焦虑", max_new_tokens=24, repetition_penalty=1.2)
    Decoder(generator.model).run(answering.row)
    ids = torch.tensor([answering.row.prompt])
    config = generator.generation_config(Sampling(max_new_tokens=24, repetition_penalty=1.2))
    with torch.inference_mode():
        out = generator.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert answering.row.answer == out[0, ids.shape[1]:].tolist()


def test_seeded_rows_sample_alike_alone_and_in_a_batch(generator):
    alone = start(generator, "你好", temperature=1.0, seed=5, max_new_tokens=16)
    Decoder(generator.model).run(alone.row)
    decoder = Decoder(generator.model)
    batched = start(generator, "你好", temperature=1.0, seed=5, max_new_tokens=16)
    other = start(generator, "我最近很焦虑，晚上睡不着。", temperature=1.0, max_new_tokens=16)
    decoder.add(other.row)
    decoder.add(batched.row)
    while decoder.rows:
        decoder.step()
    assert batched.row.answer == alone.row.answer  # its own generator: the other row's draws do not move it
    again = start(generator, "你好", temperature=1.0, seed=6, max_new_tokens=16)
    Decoder(generator.model).run(again.row)
    assert again.row.answer != alone.row.answer


def test_prompts_arriving_together_are_prefilled_in_one_forward_and_answer_as_alone(generator):
    """Decoder.add_all: prompts of different lengths (one with a repetition penalty, one seeded and sampled) are
    prefilled in one forward, padded, both from nothing and after the positions a prompt cache gives them (the
    template's start, kept from an earlier prompt: the padding then sits between the cached positions and the rest);
    rows already decoding go on beside them, and every row answers as it would alone."""
    model = generator.model
    questions = ["你好", "我和父母总是吵架，我该怎么办？", "我最近很焦虑，晚上睡不着，白天也没有精神。"]
    forwards = []
    hook = model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        for prompts in (None, PromptCache(16)):
            decoder = Decoder(model, prompts=prompts)
            under_way = start(generator, "先说一句话。", max_new_tokens=12)
            assert not decoder.add(under_way.row)  # (kept by the cache: the others share its start)
            decoder.step()
            rows = [start(generator, questions[0], max_new_tokens=10).row,
                    start(generator, questions[1], max_new_tokens=10, repetition_penalty=1.3).row,
                    start(generator, questions[2], max_new_tokens=10, temperature=1.0, seed=3).row]
            assert len({len(row.prompt) for row in rows}) == 3
            forwards.clear()
            assert decoder.add_all(rows) == [] and len(forwards) == 1
            if prompts is not None:  # each started from the shared start kept from the first prompt
                shared = common_prefix(under_way.row.prompt, rows[0].prompt)
                assert shared > 0 and prompts.reused == 3 * shared
            while decoder.rows:
                decoder.step()
            for row in [under_way.row] + rows:
                assert len(row.answer) == row.max_new_tokens
                if row.greedy:
                    assert_as_alone(model, row)
            seeded = start(generator, questions[2], max_new_tokens=10, temperature=1.0, seed=3).row
            assert Decoder(model).run(seeded).answer == rows[2].answer
    finally:
        hook.remove()


def test_prompts_holding_different_cached_starts_are_prefilled_in_one_forward_and_answer_as_alone(generator):
    """Prompts arriving together whose caches hold different numbers of positions (one shares more of a kept prompt's
    start than another; one shares nothing) are still prefilled in one forward, the cached positions left-padded to
    the most any holds, and every row answers as it would alone. Grouped by their exact counts, a server's 8 requests
    were prefilled in ~6 forwards."""
    model, prompts = generator.model, PromptCache(16)
    kept = conversation_ids(generator, "我最近很焦虑，晚上睡不着。")
    decoder = Decoder(model, prompts=prompts)
    decoder.run(Row(kept, 4, frozenset()))
    more = conversation_ids(generator, "我最近很焦虑，晚上睡不着。白天也没有精神，怎么办？")
    less = conversation_ids(generator, "你好")
    unshared = list(reversed(less))  # its first token differs from the kept prompt's: nothing cached
    held = [min(common_prefix(kept, p), len(p) - 1) for p in (more, less, unshared)]
    assert held[0] > held[1] > held[2] == 0
    penalised = start(generator, "你好", max_new_tokens=8, repetition_penalty=1.3).row
    assert penalised.prompt == less
    rows = [Row(more, 8, frozenset()), penalised, Row(unshared, 8, frozenset())]
    forwards = []
    hook = model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        assert decoder.add_all(rows) == [] and len(forwards) == 1
    finally:
        hook.remove()
    assert prompts.reused == sum(held)
    while decoder.rows:
        decoder.step()
    for row in rows:
        assert len(row.answer) == 8
        assert_as_alone(model, row)


def test_prompts_whose_cached_starts_are_far_apart_are_prefilled_in_separate_forwards():
    """A conversation's next turn (thousands of cached positions) is not padded into new prompts' forward (a few
    dozen): the others would attend over all that padding."""
    prompts = [(0, "a"), (HELD_APART + 44, "b"), (10, "c"), (HELD_APART, "d"), (3000, "e")]
    assert held_alike(prompts) == [[(0, "a"), (10, "c"), (HELD_APART, "d")], [(HELD_APART + 44, "b")], [(3000, "e")]]


# ---------------------------------------------------------------- the prompt cache

def conversation_ids(generator, *turns: str) -> list[int]:
    """The prompt of a conversation whose turns alternate user, assistant, user..."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return generator.prompt_ids(messages)


def test_a_conversations_next_turn_prefills_only_what_is_new(generator):
    """The REPL's and the server's prompt cache: the next turn of a conversation repeats the whole conversation so
    far; it starts from the kept positions of the turn before (all of them) and answers as it would without the
    cache. The longer prompt replaces the kept one it begins with."""
    model, prompts = generator.model, PromptCache(16)
    first = conversation_ids(generator, "我最近很焦虑，晚上睡不着。")
    decoder = Decoder(model, prompts=prompts)
    decoder.run(Row(first, 8, frozenset()))
    assert prompts.reused == 0 and [e.prompt for e in prompts.entries] == [first]
    assert [k.shape[2] for k, _ in prompts.entries[0].layers] == [len(first)] * model.config.num_hidden_layers
    second = conversation_ids(generator, "我最近很焦虑，晚上睡不着。", "别担心，我们慢慢说。", "白天也没有精神，怎么办？")
    assert second[:len(first)] == first
    cached = decoder.run(Row(second, 12, frozenset()))
    assert prompts.reused == len(first) and [e.prompt for e in prompts.entries] == [second]
    assert cached.answer == Decoder(model).run(Row(second, 12, frozenset())).answer
    assert_as_alone(model, cached)


def test_the_prompt_cache_keeps_the_most_recent_prompts_within_its_budget(generator):
    """Prompts sharing only the template's start reuse that; the least recently used are dropped past the budget; a
    prompt kept whole is not prefilled at all and answers as the first time; a chunked prefill starts after what is
    reused. The kept tensors do not change while answers decode from their copies."""
    model = generator.model
    questions = ["你好", "我和父母总是吵架。", "我最近很焦虑，晚上睡不着，怎么办？"]
    ids = [conversation_ids(generator, q) for q in questions]
    assert len(ids[0]) < len(ids[1]) < len(ids[2]) < len(ids[0]) + len(ids[1])
    prompts = PromptCache(16)
    decoder = Decoder(model, prompts=prompts)
    decoder.run(Row(ids[0], 4, frozenset()))
    per_position = prompts.entries[0].nbytes // len(ids[0]) + 1
    prompts.budget = per_position * (len(ids[0]) + len(ids[1]))  # room for the first two prompts, not the third
    decoder.run(Row(ids[1], 4, frozenset()))
    assert prompts.reused == common_prefix(ids[0], ids[1]) > 0  # the template's start (its system prompt)
    assert [e.prompt for e in prompts.entries] == ids[:2]
    decoder.run(Row(ids[2], 4, frozenset()))  # over the budget: the least recently used go until it fits
    assert [e.prompt for e in prompts.entries] == [ids[2]]
    kept = prompts.entries[0].layers
    as_kept = [(k.clone(), v.clone()) for k, v in kept]
    before = prompts.reused
    first = Decoder(model).run(Row(ids[2], 4, frozenset()))
    again = decoder.run(Row(ids[2], 4, frozenset()))  # kept whole: nothing prefilled, its logits kept too
    assert prompts.reused - before == len(ids[2]) and again.answer == first.answer
    prompts.budget *= 2  # room for the row under way's prompt beside it
    under_way = Decoder(model, prompts=prompts)
    under_way.add(Row(ids[0], 20, frozenset()))
    next_turn = conversation_ids(generator, questions[2], "别担心。", "谢谢")
    assert not under_way.add(Row(next_turn, 4, frozenset()), chunk=2)
    assert under_way.prefills[0].done == len(ids[2])  # chunks of what is new only
    while under_way.in_flight:
        under_way.step()
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(kept, as_kept))


# ---------------------------------------------------------------- one-row products on all threads

@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("out_features,in_features,bias", [(1536, 576, False), (192, 576, True), (576, 1536, False),
                                                           (49152, 576, False), (150, 64, True), (64, 5, False)])
def test_split_products_give_the_same_bits_as_the_layer(two_threads, out_features, in_features, bias):
    """The split forward is bit-identical to nn.Linear's for a token, a batch of tokens and a prompt; aligned weights
    are split (bmm / baddbmm run), ragged ones (150 rows: 75 per thread; 5 columns) left to F.linear."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(in_features, out_features, bias=bias)
    split = torch.nn.Linear(in_features, out_features, bias=bias)
    split.load_state_dict(plain.state_dict())
    assert split_products(split) == 1
    aligned = out_features % 32 == 0 and in_features % 16 == 0
    for shape in [(1, in_features), (1, 1, in_features), (3, 1, in_features), (45, in_features),
                  (2, 130, in_features)]:
        x = torch.randn(*shape)
        with torch.inference_mode(), torch.profiler.profile() as prof:
            got = split(x)
        ops = {e.name for e in prof.events()}
        assert (("aten::baddbmm" if bias else "aten::bmm") in ops) == aligned, (shape, sorted(ops))
        with torch.inference_mode():
            assert torch.equal(got, plain(x)), shape
    x = torch.randn(4, in_features, requires_grad=True)  # with autograd on: nn.Linear's own forward, as for training
    assert torch.equal(split(x), plain(x))


def test_split_products_leave_answers_and_other_layers_alone(generator, two_threads):
    """A model given split products decodes the same greedy tokens as generate() on the model as it comes; bf16
    layers are not split (torch's bf16 one-row kernel is already threaded)."""
    model = generator.model
    split = LlamaForCausalLM(model.config).eval()
    split.load_state_dict(model.state_dict())
    assert split_products(split) == 2 * 7 + 1
    answering = start(generator, "我最近很焦虑", max_new_tokens=24)
    Decoder(split).run(answering.row)
    ids = torch.tensor([answering.row.prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             generation_config=generator.generation_config(Sampling(max_new_tokens=24)))
    assert answering.row.answer == out[0, ids.shape[1]:].tolist()
    assert split_products(torch.nn.Linear(64, 64).bfloat16()) == 0


def test_generate_many_answers_as_generate_alone(generator):
    """Eval's and GRPO's path: several conversations decoded together, at most max_batch at once (the third joins
    when one ends), each answer the one `generate` gives alone; on_done is called once per answer."""
    questions = ["你好", "我最近很焦虑，晚上睡不着，白天也没有精神，怎么办？", "我和父母总是吵架。"]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    sampling = Sampling(max_new_tokens=12, repetition_penalty=1.2)
    done = []
    together = generator.generate_many(conversations, sampling, max_batch=2, on_done=lambda: done.append(1))
    assert len(done) == 3
    assert together == [generator.generate(c, sampling) for c in conversations]
