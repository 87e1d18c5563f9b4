"""Data preparation: records/s of common.dataset.build_datasets on the counselling conversations, cold (read, template,
tokenize, write the Arrow cache) against cached (read the Arrow cache), alternating; and cold preparation's tokens/s
at 1 and 2 processes (data.num_proc) against its ceiling, the raw batched tokenizer on the same text (the template's
pieces of every conversation in one `tokenizer(list)` call), one run each.

    python bench/dataprep.py [--quick]

Each cold run gets a fresh, empty cache directory and a freshly loaded tokenizer (the tokenizer keeps a word cache);
the cached run that follows reads what it wrote. Tokenizer loading is outside the timing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.training import MODEL, RECIPE, data_path  # noqa: E402

PAIRS = 3


def _timed_build(data_file: Path, cache: Path, max_length: int, *overrides: str) -> tuple[float, int, int]:
    import datasets

    from common.dataset import build_datasets
    from common.modeling import recipe_tokenizer
    from common.recipe import load_recipe

    datasets.config.HF_DATASETS_CACHE = str(cache)  # read by common.dataset.cache_dir() at each call
    recipe = load_recipe(RECIPE, [f"model.path={MODEL}", f"data.path={data_file}", f"data.max_length={max_length}",
                                  *overrides])
    tokenizer = recipe_tokenizer(recipe)
    start = time.perf_counter()
    rows, _, stats = build_datasets(recipe, tokenizer)
    return time.perf_counter() - start, stats["records"], len(rows)


def run(quick: bool, pairs: int = PAIRS) -> dict:
    import datasets

    datasets.disable_progress_bars()
    source = data_path()
    records = json.loads(source.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="dataprep-bench-") as tmp:
        tmp = Path(tmp)
        data_file = source
        if quick:
            data_file = tmp / "data.json"
            data_file.write_text(json.dumps(records[:100], ensure_ascii=False), encoding="utf-8")
        cold, cached = [], []
        for i in range(1 if quick else pairs):
            cache = tmp / f"cache-{i}"
            cold.append(_timed_build(data_file, cache, 512))
            cached.append(_timed_build(data_file, cache, 512))
        ceiling = _ceiling(data_file, tmp, PROCESSES)
    n = cold[0][1]
    result = {"ceiling": ceiling, "bench": "dataprep", "quick": quick, "data": str(source), "records": n,
              "samples": cold[0][2],
              "cold_seconds": [round(c[0], 3) for c in cold], "cached_seconds": [round(c[0], 3) for c in cached]}
    result["median_cold_seconds"] = round(statistics.median(result["cold_seconds"]), 3)
    result["median_cached_seconds"] = round(statistics.median(result["cached_seconds"]), 3)
    result["cold_records_per_s"] = round(n / result["median_cold_seconds"], 1)
    result["cached_records_per_s"] = round(n / result["median_cached_seconds"], 1)
    result["speedup_cached"] = round(result["median_cold_seconds"] / result["median_cached_seconds"], 1)
    return result


PROCESSES = (1, 2)
CEILING_TEMPLATE = "qwen_chat"  # an XTuner template: its pieces are what preparation tokenizes, batched


def _ceiling(data_file: Path, tmp: Path, processes) -> dict:
    """Cold preparation (qwen_chat, cut at 2048: one encoding per conversation) at each process count, and the raw
    batched tokenizer on the same text, in this process, one after the other."""
    from transformers import AutoTokenizer

    from common.formats import load_conversations
    from common.templates import get_template

    template = get_template(CEILING_TEMPLATE)
    pieces = [text for turns in load_conversations([str(data_file)]) for text in template.pieces(turns)]
    tokenizer = AutoTokenizer.from_pretrained(MODEL)  # fresh: no word cache from earlier runs
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"])
    raw = time.perf_counter() - start
    out = {"template": CEILING_TEMPLATE, "tokens": tokens, "tokenizer_seconds": round(raw, 3),
           "tokenizer_tokens_per_s": round(tokens / raw)}
    for n in processes:
        seconds = _timed_build(data_file, tmp / f"ceiling-{n}", 2048, f"data.template={CEILING_TEMPLATE}",
                               "data.truncation=cut", "data.pack=false", f"data.num_proc={n}")[0]
        out[f"prep_{n}_seconds"] = round(seconds, 3)
        out[f"prep_{n}_tokens_per_s"] = round(tokens / seconds)
        out[f"prep_{n}_share"] = round(raw / seconds, 3)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
