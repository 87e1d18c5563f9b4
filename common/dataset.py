"""A recipe's data -> train and eval rows: read (formats), hold out (eval_path or eval_fraction), encode (samples),
and cache the encoded rows as Arrow (through `datasets`) under a key of everything they depend on.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from common.cli import UserError
from common.conversation import Turn
from common.formats import LoadReport, load_conversations
from common.samples import Stats, encode_conversations, packing_stats
from common.templates import get_template


def recipe_conversations(recipe, report: LoadReport | None = None,
                         load=load_conversations) -> tuple[list[list[Turn]], list[list[Turn]]]:
    """(training, held-out) conversations of a recipe: data.eval_path, else a data.eval_fraction share drawn with
    train.seed, else none held out. eval.py scores the same held-out conversations that training evaluated on.
    `load` reads the files (common.pairs.load_pairs: preference pairs, held out the same way)."""
    d = recipe.data
    report = LoadReport() if report is None else report
    conversations = load(d.paths, d.format, d.on_bad_record, report)
    held_out = load(d.eval_paths, d.format, d.on_bad_record, report) if d.eval_paths else []
    if d.eval_fraction and not held_out:
        order = list(range(len(conversations)))
        random.Random(recipe.train.seed).shuffle(order)
        held = set(order[: max(1, round(len(conversations) * d.eval_fraction))])
        held_out = [c for i, c in enumerate(conversations) if i in held]
        conversations = [c for i, c in enumerate(conversations) if i not in held]
    return conversations, held_out


def _encode_recipe_data(recipe, tokenizer, report: LoadReport) -> tuple[list[dict], list[dict], Stats]:
    d = recipe.data
    conversations, eval_conversations = recipe_conversations(recipe, report)
    template = get_template(d.template, d.thinking)
    for text in template.notes(tokenizer, conversations):
        report.note(text)
    args = (tokenizer, template, d.max_length, d.truncation, d.system)
    train_rows, stats = encode_conversations(conversations, *args, thinking=d.thinking)
    stats.skipped = len(report.skipped)
    eval_rows = encode_conversations(eval_conversations, *args, thinking=d.thinking)[0] if eval_conversations else []
    if train_rows and d.pack:
        stats.packed_rows, stats.packing_efficiency = packing_stats(train_rows, d.max_length, d.shuffle_before_pack,
                                                                    recipe.train.seed)
    return train_rows, eval_rows, stats


# Bump when the encoding's output changes in a way the source hash below cannot see.
CACHE_VERSION = "1"


def _cache_key(recipe, tokenizer) -> str:
    """Everything the encoded rows depend on: data files, data settings, tokenizer, and this code."""
    import dataclasses
    import hashlib

    h = hashlib.sha256(CACHE_VERSION.encode())
    here = Path(__file__).parent
    sources = ("conversation.py", "formats.py", "samples.py", "dataset.py", "templates.py", "prompt_templates.json")
    for source in [*sources, *sorted(p.relative_to(here) for p in (here / "chat_templates").iterdir())]:
        h.update((here / source).read_bytes())
    h.update(json.dumps([dataclasses.asdict(recipe.data), recipe.train.seed], sort_keys=True).encode())
    for name in recipe.data.paths + recipe.data.eval_paths:
        h.update(name.encode() + Path(name).read_bytes() if Path(name).is_file() else name.encode())
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
        train_rows = load_from_disk(str(where / "train")).to_list()
        eval_rows = load_from_disk(str(where / "eval")).to_list() if (where / "eval").exists() else []
    except Exception as e:  # our own disposable file, not the user's: encode again rather than stop
        print(f"note: the encoded-data cache {where} is damaged ({type(e).__name__}); encoding again", file=sys.stderr)
        import shutil

        shutil.rmtree(where, ignore_errors=True)
        return None
    return meta, train_rows, eval_rows


def build_datasets(recipe, tokenizer, report: LoadReport | None = None, use_cache: bool = True):
    """Train and eval rows (unpacked, in input order) and the stats that --dry-run prints.

    Encoded rows are cached (Arrow, through `datasets`) under a key of everything they depend on, so a re-run
    of the same recipe on the same data and tokenizer skips reading and tokenizing."""
    from datasets import Dataset

    report = LoadReport() if report is None else report
    where = cache_dir() / _cache_key(recipe, tokenizer) if use_cache else None
    cached = _read_cache(where) if where is not None and (where / "meta.json").is_file() else None
    if cached is not None:
        meta, train_rows, eval_rows = cached
        report.notes[:], report.skipped[:] = meta["notes"], meta["skipped"]
        stats = Stats(**meta["stats"])
    else:
        train_rows, eval_rows, stats = _encode_recipe_data(recipe, tokenizer, report)
        if where is not None and train_rows:
            from common.artifacts import atomic_dir

            with atomic_dir(where, replace=False) as tmp:  # another process (a DDP rank) may cache it first
                Dataset.from_list(train_rows).save_to_disk(str(tmp / "train"))
                if eval_rows:
                    Dataset.from_list(eval_rows).save_to_disk(str(tmp / "eval"))
                meta = {"notes": report.notes, "skipped": report.skipped, "stats": vars(stats)}
                (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    report.tell()
    if not train_rows:
        d = recipe.data
        raise UserError(f"{', '.join(d.paths)}: no training sample left (records: {stats.records}, dropped: {stats.dropped})")
    return train_rows, eval_rows, vars(stats)
