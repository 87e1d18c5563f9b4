"""A recipe's data -> train and eval rows: read (formats, streamed), hold out (eval_path or eval_fraction), mix
(sources with weights), encode (samples, in batches, in data.num_proc processes), and cache the encoded rows as Arrow
(through `datasets`) under a key of everything they depend on.

Nothing here holds the whole data set in memory: the conversations are written to Arrow as they are read
(Dataset.from_generator), encoded by Dataset.map into Arrow again, and the rows handed to training are that Arrow
file, memory-mapped. Peak memory is set by the batch sizes below, not by the file.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from common.cli import UserError
from common.conversation import Turn
from common.formats import LoadReport, load_conversations, stream_conversations
from common.samples import Stats, encode_conversations, packing_stats
from common.templates import get_template

# Conversations per batch of the encoding map: one batched tokenizer call per batch; a few MB of text and ids.
ENCODE_BATCH = 256
# By default (data.num_proc: null), a process only for every this many conversations: below it, starting processes
# costs more than it saves. A num_proc the recipe sets is used as it is.
PER_PROCESS = 1000
COUNTED = [f.name for f in fields(Stats) if f.type in ("int", int) and f.name not in ("packed_rows", "skipped")]


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def held_out_indices(n: int, fraction: float, seed: int) -> set[int]:
    """Which of n conversations a data.eval_fraction holds out: a share drawn with train.seed."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[: max(1, round(n * fraction))])


def recipe_conversations(recipe, report: LoadReport | None = None,
                         load=load_conversations) -> tuple[list[list[Turn]], list[list[Turn]]]:
    """(training, held-out) conversations of a recipe, in memory: data.eval_path, else a data.eval_fraction share drawn
    with train.seed, else none held out. eval.py scores the held-out conversations that training evaluated on (a
    mixture's held-out conversations are drawn per source, as training draws them). `load` reads the files
    (common.pairs.load_pairs: preference pairs, held out the same way)."""
    d = recipe.data
    report = LoadReport() if report is None else report
    held_out = load(d.eval_paths, d.format, d.on_bad_record, report) if d.eval_paths else []
    groups = [[s.path] for s in d.sources] if d.mixed and not held_out else [d.paths]
    conversations = []
    for paths in groups:
        group = load(paths, d.format, d.on_bad_record, report)
        if d.eval_fraction and not d.eval_paths:
            held = held_out_indices(len(group), d.eval_fraction, recipe.train.seed)
            held_out += [c for i, c in enumerate(group) if i in held]
            group = [c for i, c in enumerate(group) if i not in held]
        conversations += group
    return conversations, held_out


# ---------------------------------------------------------------- the streamed, cached pipeline

def _conversation_features():
    from datasets import Features, List, Value

    turn = {"input": Value("string"), "output": Value("string"), "system": Value("string"), "train": Value("bool")}
    return Features({"source": Value("int32"), "turns": List(turn)})


def _row_features():
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")), "source": Value("int32"),
                     "trained": Value("int64"), "keep": Value("bool"), **{k: Value("int64") for k in COUNTED}})


def _generate(sources, fmt: str, on_bad_record: str, report: LoadReport):
    files = [(s.path, s.format or fmt) for s in sources]
    for k, turns in stream_conversations(files, on_bad_record, report):
        yield {"source": k, "turns": [asdict(t) for t in turns]}


def _read(sources, d, report: LoadReport, work: Path, name: str):
    """The sources' conversations as an Arrow dataset written as they are read (a `source` column says whose)."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return Dataset.from_generator(_generate, features=_conversation_features(), cache_dir=str(work / name),
                                      # a tuple: `datasets` would split a list among generator calls
                                      gen_kwargs={"sources": tuple(sources), "fmt": d.format,
                                                  "on_bad_record": d.on_bad_record, "report": report},
                                      fingerprint=name)
    except DatasetGenerationError as e:  # `datasets` wraps what the reader raised: a broken record is the user's line
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def _source_ranges(conversations, count: int) -> list[range]:
    """Each source's rows: the reader writes the sources one after another."""
    import pyarrow.compute as pc

    column = conversations.with_format("arrow")["source"] if len(conversations) else None
    counts = [0] * count
    if column is not None:
        for item in pc.value_counts(column).to_pylist():
            counts[item["values"]] = item["counts"]
    starts = [sum(counts[:k]) for k in range(count)]
    return [range(s, s + n) for s, n in zip(starts, counts)]


def _mix(ranges: list[range], sources, where: str, seed: int) -> list[int]:
    """Conversations drawn from each source to its weight's share, without repeats: the largest mixture in which the
    source with the fewest conversations for its share gives all of them; each source's draw keeps file order."""
    total = sum(s.weight for s in sources)
    shares = [s.weight / total for s in sources]
    size = min(len(r) / share for r, share in zip(ranges, shares))
    picked = []
    for r, share, s in zip(ranges, shares, sources):
        n = min(round(share * size), len(r))
        if n == 0:
            raise UserError(f"{where}: the shares cannot be met: {s.path} (weight {s.weight:g}, {100 * share:.1f}%) "
                            f"gets no conversation of a mixture of {int(size)} ({len(r)} read from it); raise its "
                            "weight or add conversations")
        picked += sorted(random.Random(seed).sample(list(r), n))
    return picked


def _select(conversations, sources, mixed: bool, seed: int, where: str, fraction: float):
    """(training, held-out) conversations of a read dataset: a share held out (per source in a mixture), then the
    mixture drawn."""
    ranges = _source_ranges(conversations, len(sources))
    train, held = [], []
    groups = ranges if mixed else [range(len(conversations))]
    for r in groups:
        out = {r[i] for i in held_out_indices(len(r), fraction, seed)} if fraction and len(r) else set()
        held += [i for i in r if i in out]
        train += [i for i in r if i not in out]
    if mixed:
        keep = set(train)
        train = _mix([[i for i in r if i in keep] for r in ranges], sources, where, seed)
    return conversations.select(train) if len(train) != len(conversations) else conversations, held


def source_rules(d, sources) -> list[tuple[str, str | None, str, str]]:
    """Each source's (template, system prompt, truncation, thinking): its own or the data section's; data.thinking
    for all."""
    return [(s.template or d.template, s.system if s.system is not None else d.system, s.truncation or d.truncation,
             d.thinking) for s in sources]


def _encode_batch(batch, tokenizer, rules, max_length: int) -> dict:
    """A batch of conversations -> their samples. The batch's counts (Stats) ride on its first row; a batch without
    a sample gets one empty row (keep: false) that carries them."""
    out = {key: [] for key in ("input_ids", "labels", "source", "trained", "keep", *COUNTED)}
    stats = Stats()
    sources, turns = batch["source"], batch["turns"]
    start = 0
    while start < len(sources):  # a run of conversations of one source at a time: its template rules
        end = start
        while end < len(sources) and sources[end] == sources[start]:
            end += 1
        template, system, mode, thinking = rules[sources[start]]
        conversations = [[Turn(**t) for t in c] for c in turns[start:end]]
        rows, _ = encode_conversations(conversations, tokenizer, get_template(template, thinking), max_length, mode,
                                       system, stats, thinking)
        for row in rows:
            out["input_ids"].append(row["input_ids"])
            out["labels"].append(row["labels"])
            out["trained"].append(len(row["labels"]) - row["labels"].count(-100))
        out["source"] += [sources[start]] * len(rows)
        start = end
    out["keep"] = [True] * len(out["input_ids"])
    if not out["keep"]:
        out.update(input_ids=[[]], labels=[[]], source=[sources[0]], trained=[0], keep=[False])
    for key in COUNTED:
        out[key] = [getattr(stats, key)] + [0] * (len(out["keep"]) - 1)
    return out


def _encode(conversations, sources, d, tokenizer, work: Path, name: str, num_proc: int):
    """Encoded rows (Arrow) of the conversations, the counts (Stats) and the realised share of each source."""
    import pyarrow.compute as pc

    rules = source_rules(d, sources)
    procs = num_proc or max(1, min(default_num_proc(), len(conversations) // PER_PROCESS))
    rows = conversations.map(_encode_batch, batched=True, batch_size=ENCODE_BATCH,
                             num_proc=procs if procs > 1 else None,
                             remove_columns=conversations.column_names, features=_row_features(),
                             fn_kwargs={"tokenizer": tokenizer, "rules": rules, "max_length": d.max_length},
                             cache_file_name=str(work / f"{name}.arrow"), new_fingerprint=name)
    stats = Stats()
    shares = [{"path": s.path, "conversations": 0, "samples": 0, "trained_tokens": 0} for s in sources]
    dropped_rows = 0
    for batch in rows.with_format("arrow").select_columns(["source", "trained", "keep", *COUNTED]).iter(1 << 16):
        for key in COUNTED:
            setattr(stats, key, getattr(stats, key) + (pc.sum(batch[key]).as_py() or 0))
        dropped_rows += len(batch) - (pc.sum(batch["keep"]).as_py() or 0)
        by_source = batch.filter(batch["keep"]).group_by("source")
        for item in by_source.aggregate([("trained", "sum"), ("trained", "count")]).to_pylist():
            shares[item["source"]]["samples"] += item["trained_count"]
            shares[item["source"]]["trained_tokens"] += item["trained_sum"]
    for k, r in enumerate(_source_ranges(conversations, len(sources))):
        shares[k]["conversations"] = len(r)
    if dropped_rows:
        rows = rows.filter(lambda keep: keep, input_columns="keep", batched=False)
    return rows.select_columns(["input_ids", "labels"]), stats, shares


def _prepare(recipe, tokenizer, report: LoadReport, work: Path):
    """(train rows, eval rows, stats) of a recipe, written under `work` as it goes."""
    d, seed = recipe.data, recipe.train.seed
    num_proc = d.num_proc
    sources = d.sources
    conversations = _read(sources, d, report, work, "conversations")
    eval_sources = d.eval_sources
    fraction = d.eval_fraction if not eval_sources else 0.0
    train, held = _select(conversations, sources, d.mixed, seed, "data.path", fraction)
    if eval_sources:
        read = _read(eval_sources, d, report, work, "eval_conversations")
        evals = _select(read, eval_sources, d.eval_mixed, seed, "data.eval_path", 0.0)[0]
    else:
        eval_sources, evals = sources, conversations.select(held) if held else None
    template = get_template(d.template, d.thinking)
    for text in template.notes(tokenizer, _first_conversations(train)):
        report.note(text)
    train_rows, stats, shares = _encode(train, sources, d, tokenizer, work, "train", num_proc)
    stats.skipped = len(report.skipped)
    stats.sources = shares if len(sources) > 1 else []
    eval_rows = None
    if evals is not None and len(evals):
        eval_rows, _, eval_shares = _encode(evals, eval_sources, d, tokenizer, work, "eval", num_proc)
        stats.eval_sources = eval_shares if len(eval_sources) > 1 else []
    if len(train_rows) and d.pack:
        stats.packed_rows, stats.packing_efficiency = packing_stats(train_rows, d.max_length, d.shuffle_before_pack,
                                                                    seed)
    return train_rows, eval_rows, stats


def _first_conversations(conversations, n: int = 1000) -> list[list[Turn]]:
    """The first n conversations as turns: what the template's notes look at."""
    part = conversations.select(range(min(n, len(conversations))))
    return [[Turn(**t) for t in c] for c in part["turns"]]


# Bump when the encoding's output changes in a way the source hash below cannot see.
CACHE_VERSION = "2"


def _cache_key(recipe, tokenizer) -> str:
    """Everything the encoded rows depend on: data files, data settings, tokenizer, and this code."""
    import hashlib

    h = hashlib.sha256(CACHE_VERSION.encode())
    here = Path(__file__).parent
    sources = ("conversation.py", "formats.py", "samples.py", "dataset.py", "templates.py", "prompt_templates.json")
    for source in [*sources, *sorted(p.relative_to(here) for p in (here / "chat_templates").iterdir())]:
        h.update((here / source).read_bytes())
    settings = {k: v for k, v in asdict(recipe.data).items() if k != "num_proc"}  # the same rows in any number
    h.update(json.dumps([settings, recipe.train.seed], sort_keys=True).encode())
    for name in recipe.data.paths + recipe.data.eval_paths:
        h.update(name.encode())
        if Path(name).is_file():  # the content, a block at a time (a data file may be larger than memory)
            with open(name, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    h.update(json.dumps([type(tokenizer).__name__, vocab, tokenizer.chat_template, tokenizer.bos_token,
                         tokenizer.eos_token, tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "sft_rows"


def _read_cache(where: Path):
    """(meta, train rows, eval rows) from a cache entry, or None when it is damaged: it is re-encoded then."""
    from datasets import load_from_disk

    try:
        meta = json.loads((where / "meta.json").read_text(encoding="utf-8"))
        Stats(**meta["stats"])
        train_rows = load_from_disk(str(where / "train"))
        eval_rows = load_from_disk(str(where / "eval")) if (where / "eval").exists() else None
    except Exception as e:  # our own disposable file, not the user's: encode again rather than stop
        print(f"note: the encoded-data cache {where} is damaged ({type(e).__name__}); encoding again", file=sys.stderr)
        shutil.rmtree(where, ignore_errors=True)
        return None
    return meta, train_rows, eval_rows


def build_datasets(recipe, tokenizer, report: LoadReport | None = None, use_cache: bool = True):
    """Train and eval rows (Arrow datasets of input_ids and labels, unpacked, in input order; eval rows None when
    nothing is held out) and the stats that --dry-run prints.

    Encoded rows are cached (Arrow, through `datasets`) under a key of everything they depend on, so a re-run
    of the same recipe on the same data and tokenizer skips reading and tokenizing. Without the cache, the rows live
    in a temporary directory that is removed when the process ends."""
    report = LoadReport() if report is None else report
    root = cache_dir()
    where = root / _cache_key(recipe, tokenizer) if use_cache else None
    cached = _read_cache(where) if where is not None and (where / "meta.json").is_file() else None
    if cached is not None:
        meta, train_rows, eval_rows = cached
        report.notes[:], report.skipped[:] = meta["notes"], meta["skipped"]
        stats = Stats(**meta["stats"])
    else:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="encoding-", dir=root))
        try:
            train_rows, eval_rows, stats = _prepare(recipe, tokenizer, report, work)
            if where is not None and len(train_rows):
                from common.artifacts import atomic_dir

                with atomic_dir(where, replace=False) as tmp:  # another process (a DDP rank) may cache it first
                    train_rows.save_to_disk(str(tmp / "train"))
                    if eval_rows is not None:
                        eval_rows.save_to_disk(str(tmp / "eval"))
                    meta = {"notes": report.notes, "skipped": report.skipped, "stats": vars(stats)}
                    (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
                shutil.rmtree(work, ignore_errors=True)
                _, train_rows, eval_rows = _read_cache(where)
            else:
                import atexit

                atexit.register(shutil.rmtree, work, True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    report.tell()
    if not len(train_rows):
        d = recipe.data
        raise UserError(f"{', '.join(d.paths)}: no training sample left (records: {stats.records}, "
                        f"dropped: {stats.dropped})")
    return train_rows, eval_rows, vars(stats)
