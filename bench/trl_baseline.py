"""The baseline: a plain TRL SFT script, left at the library's defaults except where the benchmark fixes a setting.

    python bench/trl_baseline.py MODEL DATA.json --max-steps N [--max-length 512] [--timing OUT.json] [--gpu] [--4bit]

What it does, exactly:
- data: the XTuner-format conversations, turned into `messages` (system, then user/assistant per turn), tokenized by
  TRL with the model's chat template; `assistant_only_loss=True`, the setting a user picks for multi-turn SFT (the loss
  on the counsellor's answers, not on the client's words). SmolLM2's template has no `{% generation %}` markers and TRL
  ships no training variant of it, so the script adds them around each assistant answer (the rendered text is unchanged).
- packing=True (TRL's default strategy `bfd`: each conversation truncated to max_length, then packed best-fit;
  padding-free), max_length 512, one packed row per optimizer step (batch 1, no accumulation).
- fp32 weights and compute (bf16=False: TRL would otherwise turn bf16 autocast on), gradient checkpointing off
  (TRL's default is on), LoRA r=16 alpha=32 dropout 0 on all linear layers (the peer job: dropout off for all).
- everything else at TRL 1.16 defaults (AdamW, lr 2e-5, linear schedule, no evaluation), except logging every step
  with the Trainer's token counter on (what bench/steptimer.py reads; train.py's runs log every step too).
- the trainer is common.training's LabelledSFTTrainer with every fast path off: SFTTrainer's own loss, attention and
  LoRA forward, plus the count of labelled tokens that the step timer reads.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # common/
from common.acceleration import FastPaths  # noqa: E402
from common.training import LabelledSFTTrainer  # noqa: E402

# SmolLM2-Instruct's own chat template with generation markers around each answer and its <|im_end|>.
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def to_messages(record):
    messages = []
    for turn in record["conversation"]:
        if turn.get("system"):
            messages.append({"role": "system", "content": turn["system"]})
        messages += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
    return {"messages": messages}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit", type=int, help="use the first N conversations")
    p.add_argument("--timing", help="write step timings (bench/steptimer.py) to this JSON file")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (bench/gpu_check.py) instead of the CPU")
    p.add_argument("--4bit", dest="four_bit", action="store_true",
                   help="QLoRA: the model in bitsandbytes NF4 with double quantization, float32 compute (as train.py's "
                        "model.quantization: 4bit)")
    args = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.chat_template = TEMPLATE
    data = load_dataset("json", data_files=args.data, split="train")
    if args.limit:
        data = data.select(range(min(args.limit, len(data))))
    data = data.map(to_messages, remove_columns=data.column_names)
    quantization = None
    if args.four_bit:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=quantization,
                                                 device_map={"": 0} if args.gpu else None)
    config = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-baseline-"), max_length=args.max_length, packing=True,
                       assistant_only_loss=True, bf16=False, gradient_checkpointing=False,
                       per_device_train_batch_size=1, max_steps=args.max_steps, save_strategy="no", report_to="none",
                       use_cpu=not args.gpu, disable_tqdm=True, logging_steps=1, include_num_input_tokens_seen="all")
    callbacks = []
    if args.timing:
        from steptimer import StepTimer

        callbacks.append(StepTimer(args.timing, args.max_length))
    trainer = LabelledSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                 peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                        task_type="CAUSAL_LM"), callbacks=callbacks, fast_paths=FastPaths())
    trainer.train()


if __name__ == "__main__":
    sys.exit(main())
