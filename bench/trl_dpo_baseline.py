"""The preference baseline: a plain TRL DPO script, at the library's defaults except where the benchmark fixes a setting.

    python bench/trl_dpo_baseline.py MODEL PAIRS.json --max-steps N [--batch-size 2] [--timing OUT.json]

PAIRS.json holds conversational pairs (`prompt` messages, `chosen`/`rejected` assistant messages, as
data/psych_pairs.json), which TRL tokenizes with the model's chat template. LoRA r=16 alpha=32 dropout 0 on all linear
layers, float32 (bf16=False), gradient checkpointing off (TRL's default is on), max_length 512, no evaluation, no
saving, a log line every step with the Trainer's count of non-padding tokens (what bench/steptimer.py reads).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # steptimer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("pairs")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--timing", help="write step timings (bench/steptimer.py) to this JSON file")
    args = p.parse_args()

    records = json.loads(Path(args.pairs).read_text(encoding="utf-8"))
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-dpo-baseline-"), max_length=args.max_length, bf16=False,
                       gradient_checkpointing=False, per_device_train_batch_size=args.batch_size,
                       max_steps=args.max_steps, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                       logging_steps=1, include_num_input_tokens_seen="non_padding")
    callbacks = []
    if args.timing:
        from steptimer import StepTimer

        callbacks.append(StepTimer(args.timing, args.max_length))
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), args=config,
                         train_dataset=data, processing_class=AutoTokenizer.from_pretrained(args.model),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"), callbacks=callbacks)
    trainer.train()


if __name__ == "__main__":
    sys.exit(main())
