"""Trainer construction from a recipe: TRL SFTConfig/SFTTrainer on pre-tokenized rows, packing, checkpoints that
appear whole (names and rotation from common.artifacts), the final self-describing output directory, DeepSpeed
configs."""
from __future__ import annotations

import inspect
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from common import artifacts
from common.acceleration import linear_cross_entropy
from common.cli import UserError, read_json
from common.recipe import Recipe, save_recipe
from common.samples import pack_rows

# The Trainer fills the "auto" values from its own arguments (batch sizes, accumulation, clipping, precision).
DEEPSPEED_PRESETS = {
    "zero2": {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                    "reduce_bucket_size": "auto"}},
    "zero3": {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                    "stage3_gather_16bit_weights_on_model_save": True}},
}
DEEPSPEED_AUTO = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                  "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def deepspeed_config(value: str | None) -> dict | None:
    """`train.deepspeed` (zero2 | zero3 | a JSON file, checked with the recipe) as the config the Trainer takes."""
    if value is None:
        return None
    if value in DEEPSPEED_PRESETS:
        return {**DEEPSPEED_AUTO, **DEEPSPEED_PRESETS[value]}
    return read_json(value)


def sft_config(recipe: Recipe, dtype: torch.dtype, has_eval: bool, disable_tqdm: bool) -> SFTConfig:
    t, d = recipe.train, recipe.data
    every = recipe.evaluation.every_n_steps
    return SFTConfig(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        optim="adamw_torch",
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_ratio,  # a value below 1 is a fraction of the total steps
        lr_scheduler_type=t.scheduler,
        seed=t.seed,
        data_seed=t.seed,
        # bf16 weights train under bf16 autocast (the LoRA weights stay fp32); fp16 is GPU-only.
        bf16=dtype == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),  # also what lets bf16 autocast run on a CPU
        fp16=dtype == torch.float16,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        logging_first_step=True,  # the loss at the start is the reference for "is it learning"
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation is ours (artifacts.rotate), after each save is complete
        eval_strategy="steps" if has_eval and every > 0 else "no",  # train.py also evaluates once at the end
        eval_steps=every if has_eval and every > 0 else None,
        report_to=["tensorboard"],
        disable_tqdm=disable_tqdm,
        deepspeed=deepspeed_config(t.deepspeed),
        # Our rows are final: TRL keeps input_ids/labels as they are (it tokenizes and masks only rows without
        # input_ids/labels): no chat template, no completion/assistant masks, no EOS appended. Packing is ours
        # (samples.pack_rows); padding-free collation turns each row's seq_lengths into position ids that restart per sample,
        # which keeps attention inside samples. Rows are already cut to max_length, so TRL's truncation is off.
        max_length=None if d.pack else d.max_length,
        packing=False,
        padding_free=d.pack,
        shuffle_dataset=False,  # samples.pack_rows shuffled before packing; the sampler shuffles rows every epoch
        completion_only_loss=False,
        assistant_only_loss=False,
        dataset_num_proc=None,
        dataloader_num_workers=0,
        use_cache=False,
        ddp_find_unused_parameters=False,
        save_only_model=False,
        include_num_input_tokens_seen="no",
    )


class Trainer(SFTTrainer):
    """SFTTrainer whose checkpoints appear atomically (written under .saving-N/, renamed when complete) and carry
    recipe.yaml; rotation keeps the newest `save_total_limit` complete ones."""

    def __init__(self, *args, recipe: Recipe, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self._staging: Path | None = None
        self.causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # TRL's fused head scores only labelled positions, in tiles, on CUDA/XPU (Triton); elsewhere it projects
        # every position through the LM head and adds entropy and accuracy over the full vocabulary.
        self.labelled_head = (self.args.device.type not in ("cuda", "xpu")
                              and "logits_to_keep" in inspect.signature(self.causal_lm.forward).parameters)
        self.fused_head = self.labelled_head and head_is_plain_linear(self.causal_lm)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy computed only at the positions that carry a label. In SFT most positions are prompt, so this
        skips most of the LM head's matmul and softmax (on SmolLM2 the head is a fifth of the model's FLOPs); the
        loss is the same sum over labelled tokens divided by the same count."""
        if return_outputs or not self.labelled_head or self.compute_loss_func is not None or self.label_smoother:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100  # position i predicts token i + 1
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        targets = labels[:, 1:][keep[:, :-1]]
        if self.fused_head:  # the model stops at the hidden states of the labelled positions; head + loss in chunks
            head = self.causal_lm.get_output_embeddings()
            with output_embeddings(self.causal_lm, torch.nn.Identity()):
                hidden = model(**inputs, use_cache=False, logits_to_keep=keep).logits
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), head.weight, targets)
        else:
            logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (labelled positions, vocab)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets,
                                                     reduction="sum")
        count = keep.sum() if num_items_in_batch is None else num_items_in_batch
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages, num_items counts every rank
        if self.model.training:  # the tokens-fed counter that metrics.jsonl turns into tokens/s
            ids = inputs["input_ids"]
            fed = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(ids.numel())
            self._total_train_tokens += self.accelerator.gather_for_metrics(fed.to(ids.device)).sum().item()
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self.args.output_dir)
        name = f"{artifacts.CHECKPOINT_PREFIX}{self.state.global_step}"
        self._staging = run_dir / f"{artifacts.STAGING_PREFIX}{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        finally:
            staging, self._staging = self._staging, None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state into the staging dir
        if self.args.should_save:
            save_recipe(self.recipe, staging / name / artifacts.RECIPE_FILE)
            artifacts.replace_dir(staging / name, run_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
            artifacts.rotate(run_dir, self.recipe.train.save_total_limit)


@contextmanager
def output_embeddings(causal_lm, module):
    """The model with another output head for the duration (set_output_embeddings is transformers' own switch)."""
    head = causal_lm.get_output_embeddings()
    causal_lm.set_output_embeddings(module)
    try:
        yield
    finally:
        causal_lm.set_output_embeddings(head)


@torch.no_grad()
def head_is_plain_linear(causal_lm) -> bool:
    """Whether logits = hidden @ W^T exactly: a bias-free, frozen linear head, and no scaling or capping of the logits
    after it (asked of the model itself on a short input, so no list of architectures is needed)."""
    head = causal_lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return False
    ids = torch.arange(1, 9, device=head.weight.device)[None] % causal_lm.config.get_text_config().vocab_size
    was_training = causal_lm.training
    causal_lm.eval()
    half = head.weight.dtype in (torch.bfloat16, torch.float16)  # trained under autocast: checked under it
    try:
        with torch.autocast(head.weight.device.type, dtype=head.weight.dtype, enabled=half):
            logits = causal_lm(input_ids=ids, use_cache=False).logits
            with output_embeddings(causal_lm, torch.nn.Identity()):
                hidden = causal_lm(input_ids=ids, use_cache=False).logits
            return torch.equal(torch.nn.functional.linear(hidden, head.weight), logits)
    finally:
        causal_lm.train(was_training)


class _PackedRowsHint(logging.Filter):
    """TRL warns that padding-free with batch size 1 gains nothing; our rows arrive already packed, so it does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "padding-free training" not in record.getMessage()


logging.getLogger("trl.trainer.sft_trainer").addFilter(_PackedRowsHint())


def build_trainer(recipe: Recipe, model, tokenizer, train_rows: list[dict], eval_rows: list[dict] | None,
                  callbacks: list, dtype: torch.dtype, disable_tqdm: bool) -> Trainer:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from common.callbacks import QuietProgressCallback

    if not train_rows:
        raise UserError("no training rows: every record was empty or skipped")
    d = recipe.data
    if d.pack:
        train = pack_rows(train_rows, d.max_length, d.shuffle_before_pack, recipe.train.seed)
        evals = pack_rows(eval_rows, d.max_length, False, recipe.train.seed) if eval_rows else None
    else:
        columns = lambda rows: {k: [r[k] for r in rows] for k in ("input_ids", "labels")}  # noqa: E731
        train = Dataset.from_dict(columns(train_rows))
        evals = Dataset.from_dict(columns(eval_rows)) if eval_rows else None
    args = sft_config(recipe, dtype, has_eval=evals is not None, disable_tqdm=disable_tqdm)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
                      callbacks=callbacks, recipe=recipe)
    # Our own line logs replace the Trainer's dict printing; the tqdm bar stays on a TTY.
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgressCallback)
    return trainer


def packing_efficiency(trainer: Trainer, max_length: int) -> tuple[int, int, float]:
    """(real tokens, rows, real tokens / (rows * max_length)) of the prepared training set."""
    data = trainer.train_dataset
    if "seq_lengths" in data.column_names:
        real = sum(sum(lengths) for lengths in data["seq_lengths"])
    else:
        real = sum(len(ids) for ids in data["input_ids"])
    rows = len(data)
    return real, rows, real / max(rows * max_length, 1)


def save_final(trainer: Trainer, recipe: Recipe, tokenizer) -> Path:
    """OUTPUT_DIR/final/: adapter (or full model) + tokenizer with its chat template + recipe.yaml, renamed into
    place when complete."""
    run_dir = Path(trainer.args.output_dir)
    final, tmp = run_dir / artifacts.FINAL_DIR, run_dir / f"{artifacts.STAGING_PREFIX}{artifacts.FINAL_DIR}"
    trainer.save_model(str(tmp))  # the tokenizer rides along (processing_class); DDP-safe: rank 0 writes
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        tokenizer.save_pretrained(str(tmp))
        save_recipe(recipe, tmp / artifacts.RECIPE_FILE)
        artifacts.replace_dir(tmp, final)
    trainer.accelerator.wait_for_everyone()
    return final


def set_chat_template(tokenizer, template) -> None:
    """Saved tokenizers carry the recipe's template as Jinja, so chat/merge/export render prompts exactly as training
    did."""
    tokenizer.chat_template = template.chat_template(tokenizer)
