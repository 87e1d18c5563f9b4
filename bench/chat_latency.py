"""Chat: time to first token and decode tokens/s of chat.py's generation path (common.generation.Generator: the
template rendering, the stop-word criterion that decodes every step, the streaming) against bare `model.generate`
with a streamer, on the same prompt ids, greedy, the same EOS ids and max_new_tokens. Alternating A B A B.

    python bench/chat_latency.py [--quick]

Time to first token: from the call to the first visible text (chat) or the first new token (bare). Decode tokens/s:
tokens after the first, over the time after the first. Both paths produce the same tokens (checked).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.training import MODEL, data_path  # noqa: E402

PAIRS = 3
PROMPTS = 3


class FirstToken:
    """A streamer for bare generate(): its first put() is the prompt, the second the first new token."""

    def __init__(self):
        self.calls, self.first, self.tokens = 0, None, 0

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()
        if self.calls >= 2:
            self.tokens += value.numel()

    def end(self):
        pass


def run(quick: bool, pairs: int = PAIRS) -> dict:
    import torch

    from common.artifacts import resolve_model
    from common.generation import Generator, Sampling
    from common.modeling import load_for_generation
    from common.templates import get_template

    model, tokenizer = load_for_generation(resolve_model(str(MODEL)))  # chat.py's loader, its default dtype (auto)
    max_new = 8 if quick else 64
    conversations = json.loads(data_path().read_text(encoding="utf-8"))
    questions = [c["conversation"][0]["input"] for c in conversations[: (1 if quick else PROMPTS)]]
    generator = Generator(model, tokenizer, get_template("tokenizer"), max_length=2048)
    sampling = Sampling(max_new_tokens=max_new)
    config = generator.generation_config(sampling)

    def chat(question):
        marks = []
        start = time.perf_counter()
        completion = generator.generate([{"role": "user", "content": question}], sampling,
                                        on_text=lambda text: marks.append(time.perf_counter()))
        end = time.perf_counter()
        return start, marks[0], end, completion.text

    def bare(question):
        ids = generator.prompt_ids([{"role": "user", "content": question}])  # the same prompt chat() renders
        input_ids = torch.tensor([ids])
        streamer = FirstToken()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 generation_config=config, streamer=streamer)
        end = time.perf_counter()
        text = tokenizer.decode([t for t in out[0, len(ids):].tolist() if t not in generator.eos_ids],
                                skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return start, streamer.first, end, text, out.shape[1] - len(ids)

    samples = {"chat.py": [], "model.generate": []}
    bare(questions[0])  # warm-up: first-call allocations
    for round_ in range(1 if quick else pairs):
        for q in questions:
            order = ("bare", "chat") if round_ % 2 == 0 else ("chat", "bare")  # A B, then B A: no order bias
            for path in order:
                if path == "bare":
                    s, first, end, text, n = bare(q)
                    samples["model.generate"].append({"ttft": first - s, "decode": (n - 1) / (end - first),
                                                      "tokens": n})
                else:
                    s, first, end, chat_text = chat(q)
                    timing = (s, first, end)
            s, first, end = timing
            # Cut by max_new_tokens mid-character, chat.py drops the half character (U+FFFD) that decode() shows.
            samples["chat.py"].append({"ttft": first - s, "decode": (n - 1) / (end - first), "tokens": n,
                                       "same_text": chat_text.strip() == text.strip().rstrip("\ufffd")})
    result = {"bench": "chat", "quick": quick, "model": str(MODEL.relative_to(ROOT)), "dtype": str(model.dtype),
              "prompts": len(questions), "rounds": 1 if quick else pairs, "max_new_tokens": max_new,
              "same_tokens": all(s["same_text"] for s in samples["chat.py"])}
    for name, rs in samples.items():
        result[name] = {"median_ttft_s": round(statistics.median(r["ttft"] for r in rs), 4),
                        "median_decode_tokens_per_s": round(statistics.median(r["decode"] for r in rs), 2),
                        "median_tokens": statistics.median(r["tokens"] for r in rs)}
    c, b = result["chat.py"], result["model.generate"]
    result["ttft_overhead"] = round(c["median_ttft_s"] / b["median_ttft_s"] - 1, 4)
    result["decode_overhead"] = round(b["median_decode_tokens_per_s"] / c["median_decode_tokens_per_s"] - 1, 4)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
