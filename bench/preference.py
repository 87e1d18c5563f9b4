"""Preference-tuning throughput: train.py's DPO trainer (what recipes/psych_dpo.yaml builds) against plain TRL
`DPOTrainer`, and ours with the fast paths off, in one process, step for step: each measured step is the trainer's own
`compute_loss` (policy forward, reference forward with the adapter off, DPO loss) and its backward, on the same pairs,
the three trainers taking turns so that the load of a shared machine falls on all alike.

    python bench/preference.py [--steps 6] [--batch-size 2] [--quick]

Both: SmolLM2-135M-Instruct, LoRA r=16 alpha 32 dropout 0 on all linear layers, float32, batches of --batch-size of the
shipped pairs (data/psych_pairs.json, no system prompt added: TRL gets the records as they are and tokenizes them with
the model's chat template). Tokens/s counts the real tokens of the batch as TRL lays it out (prompt + chosen, prompt +
rejected, no padding), for all three, so it is a ratio of times. A warm-up step each first. The loss on each pair is
the same (tests/test_preference.py: equal per step to plain DPOTrainer's, fast paths on and off).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
RECIPE = ROOT / "recipes" / "psych_dpo.yaml"
PAIRS = ROOT / "data" / "psych_pairs.json"
BASELINE = "TRL DPOTrainer (plain)"


def train_py_trainer(recipe_file: Path, overrides: list[str], callbacks: list = ()):
    """(the trainer train.py builds for the recipe: its data, model, fast paths, template; float32, its rows, the
    recipe), as bench/preference.py and bench/grpo.py measure it."""
    from common import acceleration
    from common.methods import table as methods
    from common.modeling import load_model, recipe_tokenizer
    from common.templates import get_template
    from common.training import set_chat_template

    recipe = methods.load_recipe(recipe_file, overrides)
    tokenizer = recipe_tokenizer(recipe)
    method = methods.get(recipe.train.method)
    rows, _, _ = method.build_datasets(recipe, tokenizer)
    torch.manual_seed(recipe.train.seed)
    model = load_model(recipe, torch.float32)
    paths = acceleration.apply(model, recipe)
    set_chat_template(tokenizer, get_template(recipe.data.template))
    trainer = method.build_trainer(recipe, model, paths, tokenizer, rows, None, list(callbacks), torch.float32, True)
    trainer.fast_paths_names = paths.names()  # reported with the figures
    return trainer, rows, recipe


def ours(tmp: Path, batch: int, fast_paths: bool):
    """The trainer train.py builds for the recipe, on the base model in float32."""
    return train_py_trainer(RECIPE, [f"model.path={MODEL}", "model.dtype=float32", f"data.path={PAIRS}",
                                     "data.system=null", "data.eval_path=null", f"train.batch_size={batch}",
                                     f"train.output_dir={tmp / 'run'}", f"train.fast_paths={str(fast_paths).lower()}",
                                     "evaluation.prompts=[]"])[0]


def plain(tmp: Path, batch: int):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    records = json.loads(PAIRS.read_text(encoding="utf-8"))
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    args = DPOConfig(output_dir=str(tmp / "plain"), bf16=False, gradient_checkpointing=False, use_cpu=True,
                     per_device_train_batch_size=batch, report_to="none", max_length=512)
    return DPOTrainer(model=AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32), args=args,
                      train_dataset=data, processing_class=AutoTokenizer.from_pretrained(MODEL),
                      peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))


def step(trainer, rows: list[int]) -> tuple[float, int]:
    """Seconds of one compute_loss + backward on these pairs, and their real tokens (prompt counted per answer)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    batch = trainer._prepare_inputs(batch)
    trainer.model.train()
    start = time.perf_counter()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    seconds = time.perf_counter() - start
    trainer.model.zero_grad(set_to_none=True)
    return seconds, int(batch["attention_mask"].sum())


def run(steps: int, batch: int) -> dict:
    from common import precision

    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        tmp = Path(tmp)
        trainers = {BASELINE: plain(tmp, batch), "train.py": ours(tmp, batch, True),
                    "train.py, plain paths (train.fast_paths=false)": ours(tmp, batch, False)}
        times = {name: [] for name in trainers}
        tokens = {name: [] for name in trainers}
        for n in range(steps + 1):  # step 0: the warm-up
            rows = list(range(n * batch, (n + 1) * batch))
            for name, trainer in trainers.items():
                seconds, count = step(trainer, rows)
                if n:
                    times[name].append(seconds)
                    tokens[name].append(count)
        paths = {name: getattr(t, "fast_paths_names", None) for name, t in trainers.items()}
    result = {"bench": "preference", "model": str(MODEL.relative_to(ROOT)), "pairs": str(PAIRS.relative_to(ROOT)),
              "batch_pairs": batch, "timed_steps": steps, "torch_threads": torch.get_num_threads(),
              "machine": {"cpu": precision.cpu_description(), "native_bf16": precision.cpu_has_native_bf16()}, "runs": {}}
    for name in trainers:
        result["runs"][name] = {"fast_paths": paths[name], "tokens_per_s": round(sum(tokens[name]) / sum(times[name]), 1),
                                "median_step_s": round(statistics.median(times[name]), 3),
                                "step_seconds": [round(t, 3) for t in times[name]], "tokens": tokens[name]}
    base = result["runs"][BASELINE]["tokens_per_s"]
    for r in result["runs"].values():
        r["ratio_tokens_per_s"] = round(r["tokens_per_s"] / base, 2)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one timed step")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "preference_results.json")
    args = parser.parse_args()
    result = run(1 if args.quick else args.steps, args.batch_size)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name, r in result["runs"].items():
        print(f"{name:<48} {r['tokens_per_s']:>8.1f} tokens/s  {r['ratio_tokens_per_s']:.2f}x  "
              f"median step {r['median_step_s']:.2f} s")
