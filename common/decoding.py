"""Token-level decoding under the generation core: prompt ids in, answer ids out, for one answer or several at once.

A `Decoder` holds the answers under way (`Row`s) and advances all of them by one token per `step()`, with one model
forward for the whole batch. Their key/value caches sit in one transformers `DynamicCache`, left-padded to a common
length; the attention mask hides the padding and the position ids are counted per row, so each row computes what it
would alone (up to the float rounding of batched matrix products). A row joins after a prefill of its prompt alone
(no padding, so a lone answer is exactly a plain decode) and leaves as soon as it ends; columns that only padding
uses are trimmed. This is the server's continuous batching (requests join and leave between steps) and, with one
row, the REPL's, eval's and the training previews' decode: one loop for all of them.

Why a loop of our own rather than `generate()`: generate() decodes a fixed batch from start to end (a request
arriving later waits for the whole batch), and its sampling settings and seed are one per call; here each row has its
own (temperature, top-k/p, repetition penalty, seed, max tokens, stop test). Tokens are picked as generate() picks
them: with the logits processors it builds from the same GenerationConfig, per row. transformers' continuous-batching manager (`init_continuous_batching`) was the first
choice; it takes one do_sample and no seed for all requests.

A `PromptCache` (the REPL's and the server's) keeps the prompts prefilled last: a prompt that begins as one of them
did (the same system prompt; a conversation's next turn, which repeats the whole conversation so far) prefills only
the rest.
"""
from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Optional

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers import LogitsProcessorList


# Prompts arriving together are prefilled in one forward when at most this many of their positions are left to
# prefill (Decoder.add_all): the padded batch stays small, and a longer prompt's own forward already has rows enough
# to keep the cores busy (measured: 8 first turns of ~130 tokens on SmolLM2, 2 cores limited to AVX2, in 1.57-1.77 s
# together against 2.07-2.21 s one after another).
TOGETHER = 256
# ... and when the positions their caches already hold (from the prompt cache) differ by at most this many: the caches
# are left-padded to the most any holds, which costs the others attention over that padding only (a product of every
# position, kept or not, would cost far more). Prompts sharing more or less of an earlier one's start (a question
# beginning with the same words) hold a few positions more or less: grouped by their exact counts, bench/serving.py's
# 8 requests were prefilled in ~6 forwards, 1.47-1.53 s; in one, 1.20-1.35 s (2 cores limited to AVX2, 2026-12-08).
HELD_APART = 256


@dataclass
class Row:
    """One answer being decoded. `processors`: transformers' logits processors for this answer, the list generate()
    would build from the same GenerationConfig (repetition penalty, suppressed tokens..., and when sampling
    temperature, top-k, top-p); `greedy`: pick the top token, else sample. `should_stop(answer_ids)` is asked after
    every token (stop words, a client that left)."""

    prompt: list[int]
    max_new_tokens: int
    eos_ids: frozenset
    should_stop: Callable[[list[int]], bool] = lambda answer: False
    processors: Optional[LogitsProcessorList] = None
    greedy: bool = True
    seed: Optional[int] = None
    answer: list[int] = field(default_factory=list)
    ended: Optional[str] = None  # eos | stopped (should_stop said so) | length; None while under way

    def __post_init__(self):
        # A seeded row samples from its own generator: reproducible whatever else is in the batch, and the process's
        # RNG (training, other requests) is not moved.
        self.rng = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        self.plain_greedy = self.greedy and not self.processors  # the batch's one argmax serves it

    def push(self, token: int) -> bool:
        """Take the next token; True when the answer has ended."""
        self.answer.append(token)
        if token in self.eos_ids:
            self.ended = "eos"
        elif self.should_stop(self.answer):
            self.ended = "stopped"
        elif len(self.answer) >= self.max_new_tokens:
            self.ended = "length"
        return self.ended is not None

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's float32 logits [vocab], as generate() picks it."""
        scores = logits[None]
        if self.processors:
            seen = torch.tensor([self.prompt + self.answer], device=logits.device)
            scores = self.processors(seen, scores)
        if self.greedy:
            return int(scores.argmax())
        probs = scores.softmax(-1)
        if self.rng is not None:  # a seeded row samples on the CPU, where its generator lives
            probs = probs.cpu()
        return int(torch.multinomial(probs, 1, generator=self.rng))


@dataclass
class _Prefill:
    """A prompt prefilled `chunk` positions per Decoder.step(): its cache so far, and how many positions it holds."""

    rows: list[Row]
    cache: DynamicCache
    chunk: int
    done: int = 0


class Decoder:
    """Rows decoding together, one token each per step. Not thread-safe: one thread (the caller's, or the server's
    worker) drives it. `context()` is entered around every forward (e.g. PEFT's `disable_adapter` for base answers).
    `fast`: the model's compiled decode step (common.decode_step.FastStep, which imports this module), taken by a
    lone row and by a batch alike. `prompts`: where prompts start from the cached positions of earlier ones (only
    for a model whose weights stay as they are while it answers: not training previews, not GRPO's rollouts)."""

    def __init__(self, model, context: Callable[[], ContextManager] = nullcontext, fast=None,
                 prompts: Optional[PromptCache] = None):
        self.model, self.context, self.fast, self.prompts = model, context, fast, prompts
        self.rows: list[Row] = []
        self.cache: Optional[DynamicCache] = None
        self.mask: Optional[torch.Tensor] = None  # [rows, cached positions]: 1 real, 0 padding
        self.padded = False  # any 0 in mask: the forward needs the mask (without padding it can go without)
        self.prefills: list[_Prefill] = []  # prompts prefilled a chunk per step (add's `chunk`), oldest first

    @property
    def device(self):
        return self.model.device

    def add(self, row: Row, chunk: Optional[int] = None) -> bool:
        """Prefill the row's prompt and pick its first token; the row joins the batch unless it has already ended
        (True then). A failure leaves the batch as it was. `chunk` (the server's): while other rows are decoding or
        waiting, a prompt longer than this is prefilled `chunk` positions per step() instead, so that it does not stall
        the others for its whole prefill; its first token comes from a later step(), which returns the row if that
        token ended it."""
        return bool(self.add_all([row], chunk))

    def add_all(self, rows: list[Row], chunk: Optional[int] = None) -> list[Row]:
        """Rows with prompts of their own that arrive together (the requests that came in during a step, eval's next
        answers), each added as by `add`, except that the prompts with at most TOGETHER positions left to prefill
        (after what the prompt cache gives) are prefilled in one forward (_prefill_together; one per group of them
        whose cached starts differ by at most HELD_APART positions): one pass over the weights and one forward's
        fixed cost for all, instead of one each. Returns the rows that ended at their first
        token. A failure leaves the batch as it was: every prefill runs before any row joins."""
        others = bool(self.rows or self.prefills or len(rows) > 1)  # someone would wait on a long prefill
        ready, later, together = [], [], []  # (rows, cache, logits) to join; _Prefills; (done, row, cache)
        for row in rows:
            done, cache, logits = self._started(row.prompt)
            rest = len(row.prompt) - done
            if logits is not None:  # kept whole by the prompt cache
                ready.append(([row], cache, logits))
            elif chunk and rest > chunk and others:
                later.append(_Prefill([row], cache, chunk, done))
            elif rest <= TOGETHER and batchable(cache):
                together.append((done, row, cache))
            else:
                ready.append(([row], cache, self._prefill(row.prompt[done:], cache)))
        for group in held_alike(together):
            prefilled = self._prefill_together([row.prompt for _, row, _ in group], [c for _, _, c in group],
                                               [done for done, _, _ in group])
            ready += [([row], cache, logits) for (_, row, _), (cache, logits) in zip(group, prefilled)]
        self.prefills += later
        ended = []
        for group, cache, logits in ready:
            joined = {id(row) for row in self._first_tokens(group, cache, logits)}
            ended += [row for row in group if id(row) not in joined]
        return ended

    def add_alike(self, rows: list[Row]) -> list[Row]:
        """Rows with one prompt (a group of sampled answers to it, as GRPO draws them): one prefill, its cache
        repeated for each row, and each row picks its own first token; the rows that have not already ended join the
        batch and are returned. Each row computes what it would alone. A failure leaves the batch as it was."""
        prompt = rows[0].prompt
        assert all(r.prompt == prompt for r in rows), "add_alike takes rows with one prompt"
        return self._prefilled(rows, *self._started(prompt))

    def _started(self, prompt: list[int]) -> tuple[int, DynamicCache, Optional[torch.Tensor]]:
        """A cache for the prompt, how many of its first positions it already holds, and its last logits where it
        holds them all (from the PromptCache; see PromptCache.start)."""
        if self.prompts is None:
            return 0, DynamicCache(config=self.model.config), None
        return self.prompts.start(prompt, self.model.config)

    def _prefilled(self, rows: list[Row], done: int, cache: DynamicCache,
                   logits: Optional[torch.Tensor]) -> list[Row]:
        """The rest of the rows' one prompt prefilled after the `done` positions the cache holds (nothing where its
        last logits are given), then their first tokens (_first_tokens)."""
        if logits is None:
            logits = self._prefill(rows[0].prompt[done:], cache)
        return self._first_tokens(rows, cache, logits)

    @property
    def in_flight(self) -> list[Row]:
        """The rows decoding and those whose prompt is still being prefilled a chunk at a time."""
        return self.rows + [r for p in self.prefills for r in p.rows]

    def _prefill(self, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        """The prompt's next positions into `cache` (positions follow what it holds); the last one's float32 logits."""
        with self.context(), torch.inference_mode():
            ids = torch.tensor([ids], device=self.device)
            return self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()

    def _prefill_together(self, prompts: list[list[int]], caches: list[DynamicCache],
                          dones: list[int]) -> list[tuple[DynamicCache, torch.Tensor]]:
        """Prompts' positions after the ones each cache holds (dones), in one forward; each prompt's cache (only its
        own positions) and its last position's float32 logits. Each row is laid out as [padding, its cached
        positions | padding, its rest]: the cached positions left-padded to the most any cache holds, the rests to the
        longest, so that every row's last position is the batch's last and the LM head runs on one position per row;
        the mask hides both paddings and the position ids go on from each row's own count. A row computes what it
        would alone, up to the float rounding of a product with more rows. A prompt alone is prefilled as `_prefill`
        does, without padding or a mask."""
        if len(prompts) == 1:
            return [(caches[0], self._prefill(prompts[0][dones[0]:], caches[0]))]
        rests = [prompt[done:] for prompt, done in zip(prompts, dones)]
        held, width = max(dones), max(len(rest) for rest in rests)
        gaps = [width - len(rest) for rest in rests]
        ids = [[0] * gap + rest for gap, rest in zip(gaps, rests)]  # the padding's token: any, the mask hides it
        positions = [[done] * gap + list(range(done, done + len(rest))) for gap, rest, done in zip(gaps, rests, dones)]
        mask = [[0] * (held - done) + [1] * done + [0] * gap + [1] * len(rest)
                for gap, rest, done in zip(gaps, rests, dones)]
        ids, positions, mask = (torch.tensor(t, device=self.device) for t in (ids, positions, mask))
        cache = DynamicCache(config=self.model.config)
        if held:  # the rows' cached positions, one row each (nothing cached: padding only, shaped as another's)
            like = next(c for c, done in zip(caches, dones) if done)
            for i, layer in enumerate(cache.layers):
                layer.update(*(torch.cat([left_pad(getattr((c if done else like).layers[i], name)[:, :, :done], held)
                                          for c, done in zip(caches, dones)]) for name in ("keys", "values")))
        with self.context(), torch.inference_mode():
            logits = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1].float()
        out = []
        for row, (gap, done) in enumerate(zip(gaps, dones)):
            own = DynamicCache(config=self.model.config)
            for layer, full in zip(own.layers, cache.layers):
                keys, values = (torch.cat([t[row:row + 1, :, held - done:held], t[row:row + 1, :, held + gap:]], dim=2)
                                for t in (full.keys, full.values))
                layer.update(keys, values)
            out.append((own, logits[row]))
        return out

    def _first_tokens(self, rows: list[Row], cache: DynamicCache, logits: torch.Tensor) -> list[Row]:
        """Each row picks its first token from the prompt's last logits; those not ended join with the cache."""
        if self.prompts is not None:  # the cache holds the prompt, and only it, until the rows join
            self.prompts.keep(rows[0].prompt, cache, logits)
        with torch.inference_mode():
            joining = [r for r in rows if not r.push(r.pick(logits))]
        if joining:
            if len(joining) > 1:
                for layer in cache.layers:
                    layer.keys = layer.keys.expand(len(joining), -1, -1, -1).contiguous()
                    layer.values = layer.values.expand(len(joining), -1, -1, -1).contiguous()
            self._join(joining, cache)
        return joining

    def _advance(self) -> list[Row]:
        """The next chunk of the oldest prompt being prefilled (all the rest of it when no row is decoding: nobody
        waits on it); once its last position is in, its rows pick their first tokens and join. Returns the rows that
        ended at that first token."""
        prefill = self.prefills[0]
        prompt = prefill.rows[0].prompt
        end = prefill.done + prefill.chunk if self.rows else len(prompt)
        logits = self._prefill(prompt[prefill.done:end], prefill.cache)
        prefill.done = min(end, len(prompt))
        if prefill.done < len(prompt):
            return []
        self.prefills.pop(0)
        joined = {id(r) for r in self._first_tokens(prefill.rows, prefill.cache, logits)}
        return [r for r in prefill.rows if id(r) not in joined]

    def step(self) -> list[Row]:
        """One token for every row; returns the rows that ended (removed from the batch). If the step fails, the batch
        is emptied (its cache may be half written) and the error raised: every row it had is lost, and every prompt
        being prefilled. A prompt prefilled a chunk at a time advances by one chunk first."""
        try:
            ended = self._advance() if self.prefills else []
        except BaseException:
            self.clear()
            raise
        if not self.rows:
            return ended
        rows = self.rows
        ids = torch.tensor([[r.answer[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[len(r.prompt) + len(r.answer) - 1] for r in rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)

        def eager():
            return self.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True,
                              attention_mask=self.mask if self.padded else None).logits[:, -1]

        try:
            with self.context(), torch.inference_mode():
                # The compiled step when there is one (see common/decode_step.py), for a lone row or a batch
                compiled = self.fast is not None and self.fast.ready()
                logits = (self.fast.step(ids, positions, self.cache, eager) if compiled else eager()).float()
                # Greedy rows (the common case) take one argmax for the batch, not one per row.
                greedy = logits.argmax(-1).tolist()
                stopped = [r.push(greedy[i] if r.plain_greedy else r.pick(logits[i]))
                           for i, r in enumerate(rows)]
        except BaseException:
            self.clear()
            raise
        if any(stopped):
            self._keep([i for i, done in enumerate(stopped) if not done])
        return ended + [r for r, done in zip(rows, stopped) if done]

    def clear(self) -> None:
        """Drop everything: the batch, and the prompts being prefilled."""
        self._empty_batch()
        self.prefills = []

    def _empty_batch(self) -> None:
        self.rows, self.cache, self.mask, self.padded = [], None, None, False

    def run(self, row: Row) -> Row:
        """Decode one row to its end, alone (the REPL, eval and the training previews)."""
        if self.in_flight:
            raise RuntimeError("Decoder.run decodes one row alone; this decoder has rows under way")
        try:
            if not self.add(row):
                while not self.step():
                    pass
        finally:
            self.clear()  # Ctrl-C mid-answer included: the next answer starts clean
        return row

    def run_all(self, rows: list[Row], max_batch: int) -> Iterator[Row]:
        """Decode rows to their ends, up to `max_batch` at once, in their order: the next joins as soon as one ends,
        those joining at one step prefilled together (add_all). Yields each row as it ends (a progress bar); the
        decoder is cleared afterwards, Ctrl-C included (eval's answers, the judge's points)."""
        waiting = list(reversed(rows))
        try:
            while waiting or self.rows:
                yield from self.add_all([waiting.pop() for _ in range(min(len(waiting), max_batch - len(self.rows)))])
                yield from self.step()
        finally:
            self.clear()

    # ------------------------------------------------------------ the shared cache

    def _join(self, rows: list[Row], cache: DynamicCache) -> None:
        """Rows of one prompt length, whose cache holds one batch entry each, join the batch."""
        mask = torch.ones(len(rows), len(rows[0].prompt), dtype=torch.long, device=self.device)
        if not self.rows:
            self.rows, self.cache, self.mask, self.padded = list(rows), cache, mask, False
            return
        if not batchable(self.cache) or not batchable(cache):
            raise RuntimeError("this model's cache layers cannot be batched: decode one row at a time")
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width), left_pad(theirs.keys, width)])
            mine.values = torch.cat([left_pad(mine.values, width), left_pad(theirs.values, width)])
        self.mask = torch.cat([left_pad(self.mask, width, dim=1), left_pad(mask, width, dim=1)])
        self.rows += rows
        self.padded = True

    def _keep(self, indices: list[int]) -> None:
        """Keep these rows (in order), and trim the cache's leading columns that are padding in every kept row."""
        if not indices:  # the prompts being prefilled stay: they join an empty batch
            return self._empty_batch()
        index = torch.tensor(indices, device=self.device)
        self.rows = [self.rows[i] for i in indices]
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]
        self.padded = bool((self.mask == 0).any())


class PromptCache:
    """The key/value caches of the prompts prefilled last, up to `megabytes` in all, the least recently used dropped
    first. A position's keys and values depend only on the tokens up to it, so a prompt that begins with the same
    tokens as a kept one starts from a copy of those positions and prefills only the rest: the same computation
    (measured on SmolLM2: bit-identical logits, or within float rounding where MKL sums a product of another number
    of rows in another order). A prompt kept whole (a request sent again) takes its last position's logits too and
    is not prefilled at all, so its answer is the first one's; otherwise the last position is prefilled again (its
    logits pick the first token). A prompt kept replaces the kept ones it begins with (a conversation's earlier
    turns). Only caches of plain full-attention layers are kept (a sliding window's layer holds less than its
    positions)."""

    def __init__(self, megabytes: float):
        self.budget = int(megabytes * 2 ** 20)
        self.entries: list[_Kept] = []  # the least recently used first
        self.reused = 0  # positions not prefilled again, in all

    def start(self, prompt: list[int], config) -> tuple[int, DynamicCache, Optional[torch.Tensor]]:
        """A new cache holding as many of the prompt's first positions as a kept prompt shares with it (copies: the
        kept one stays as it is), how many that is, and the last position's logits where the prompt was kept whole
        (else None)."""
        cache = DynamicCache(config=config)
        best, found = 0, None
        for entry in self.entries:
            shared = common_prefix(entry.prompt, prompt)
            if shared > best:
                best, found = shared, entry
        whole = found is not None and found.prompt == prompt
        best = best if whole else min(best, len(prompt) - 1)
        if best < 1 or not batchable(cache):
            return 0, cache, None
        self._used(found)
        for layer, (keys, values) in zip(cache.layers, found.layers):
            layer.update(keys[:, :, :best], values[:, :, :best])  # concatenated to nothing: a copy
        self.reused += best
        return best, cache, found.logits.clone() if whole else None

    def keep(self, prompt: list[int], cache: DynamicCache, logits: torch.Tensor) -> None:
        """Keep a copy of `cache`, which holds exactly the prompt's positions (one row), and of its last position's
        logits."""
        kept = next((e for e in self.entries if e.prompt == prompt), None)
        if kept is not None:  # taken whole from here: nothing new
            return self._used(kept)
        if not batchable(cache):
            return
        if sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) > self.budget:
            return  # not even alone
        entry = _Kept(list(prompt), [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers],
                      logits.clone())
        self.entries = [e for e in self.entries if e.prompt != prompt[:len(e.prompt)]] + [entry]
        while sum(e.nbytes for e in self.entries) > self.budget:
            self.entries.pop(0)

    def _used(self, entry: _Kept) -> None:
        self.entries.remove(entry)
        self.entries.append(entry)


@dataclass
class _Kept:
    """A prompt the PromptCache keeps: its ids, each layer's keys and values [1, heads, positions, dim], and its
    last position's float32 logits."""

    prompt: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers) + self.logits.nbytes


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two prompts share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def held_alike(prompts: list[tuple]) -> list[list[tuple]]:
    """Prompts (tuples whose first item is how many positions their cache holds) in groups to prefill together: in
    order of that count, a new group where it exceeds the group's first by more than HELD_APART."""
    groups = []
    for prompt in sorted(prompts, key=lambda p: p[0]):
        if groups and prompt[0] - groups[-1][0][0] <= HELD_APART:
            groups[-1].append(prompt)
        else:
            groups.append([prompt])
    return groups


def batchable(cache: DynamicCache) -> bool:
    """Rows can share this cache: every layer a plain full-attention DynamicLayer (sliding-window and other layers
    keep state per batch that padding would corrupt)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros before `tensor` along `dim` up to `width` (cache tensors: [batch, heads, positions, head_dim])."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


# ---------------------------------------------------------------- one-row products on all threads

def split_products(model) -> int:
    """Give every plain float32 `nn.Linear` of a model loaded for generation a forward that splits the weight's output
    rows across torch's threads; returns how many. Why: a decode step multiplies one row (a token) by every weight,
    and MKL runs those float32 one-row products on one thread (measured: the same 12 GB/s with 1 or 2 threads, where
    a plain read of memory reaches 26 GB/s with two), so decoding a small model waits on one core reading its weights. As
    `bmm` over `threads` slices of the weight (a view: nothing is copied), each slice is its own product and torch
    runs them in parallel. Every output element is the same dot product, summed in the same order: the results are
    bit-identical to `F.linear` (tests/test_decoding.py checks it, bias included), so the answers do not change.
    Left as they are: other dtypes (torch's own bf16 kernel already uses every thread), quantized layers and
    adapters' own small layers (PEFT wraps the base layer, whose forward this is)."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32:
            module.forward = types.MethodType(_split_forward, module)
            count += 1
    return count


def _split_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    parts = _parts(*weight.shape, torch.get_num_threads())
    if parts < 2 or x.dtype != weight.dtype or x.device.type != "cpu" or torch.is_grad_enabled():
        return F.linear(x, weight, self.bias)
    rows = x.reshape(-1, x.shape[-1]).expand(parts, -1, -1)
    # [parts, rows, in] x [parts, in, out/parts]; out feature j*(out/parts)+i is slice j's column i
    slices = weight.view(parts, -1, weight.shape[1]).transpose(1, 2)
    y = (torch.bmm(rows, slices) if self.bias is None
         else torch.baddbmm(self.bias.view(parts, 1, -1), rows, slices))  # the bias added inside, as addmm does
    return y.transpose(0, 1).reshape(*x.shape[:-1], weight.shape[0])


# Slices of a multiple of 16 rows and columns: MKL sums a ragged tail in another order (measured: 75-row slices, or 5
# and 7 columns, differ in the last bit); model weights are such multiples (hidden, MLP and vocabulary sizes).
ALIGN = 16


@functools.lru_cache(maxsize=None)
def _parts(out_features: int, in_features: int, threads: int) -> int:
    """Into how many slices (at most one per thread) a weight splits evenly into aligned slices; 1: not at all."""
    if in_features % ALIGN:
        return 1
    return max((p for p in range(2, threads + 1) if out_features % (p * ALIGN) == 0), default=1)
