"""Trainer construction from a recipe. The run behaviour every training method shares comes from public pieces:
`run_arguments` (the TrainingArguments every method's config takes: the Trainer writes its checkpoints under a
staging directory, so a half-written one is never named checkpoint-N) and `common.callbacks.CheckpointCallback`
(recipe.yaml into each checkpoint, the rename into place, rotation). SFT is TRL's SFTTrainer on pre-tokenized rows,
with the loss at labelled positions (common.loss) where `train.fast_paths` allows it."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from common import artifacts
from common.acceleration import FastPaths
from common.cli import UserError, read_json
from common.loss import labelled_positions, token_losses
from common.recipe import DEEPSPEED_AUTO, DEEPSPEED_PRESETS, Recipe, save_recipe
from common import trackers
from common.samples import as_dataset, pack_rows


def deepspeed_config(value: str | None) -> dict | None:
    """`train.deepspeed` (a preset name or a JSON file, checked with the recipe) as the config the Trainer takes."""
    if value is None:
        return None
    if value in DEEPSPEED_PRESETS:
        return {**DEEPSPEED_AUTO, **DEEPSPEED_PRESETS[value]}
    return read_json(value)


def decoder_layers(model) -> list[str]:
    """The class names FSDP shards one by one: the model's own `_no_split_modules` (its decoder layer, the unit that
    transformers keeps whole when it spreads a model over devices), looked up through PEFT's wrappers."""
    from common.loss import causal_lm_of

    names = getattr(causal_lm_of(model), "_no_split_modules", None) or []
    present = {type(m).__name__ for m in model.modules()}
    return sorted(name for name in names if name in present)


def fsdp_arguments(recipe: Recipe, model) -> dict:
    """`train.fsdp` as the Trainer's FSDP arguments: FSDP2 through accelerate, each decoder layer a unit. full_shard
    frees a layer's gathered weights after its forward and gathers them again for its backward; shard_grad_op keeps
    them (more memory, less communication). Checkpoints are gathered into full state dicts (FULL_STATE_DICT), so a
    checkpoint's adapter or model and final/ are the same standard directories as on one process."""
    t = recipe.train
    if t.fsdp is None:
        return {}
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"`train.fsdp`: {type(model).__name__} names no decoder layer "
                        "(`_no_split_modules`) to shard by")
    return dict(fsdp=True, fsdp_config={
        "version": 2, "reshard_after_forward": t.fsdp == "full_shard", "transformer_layer_cls_to_wrap": layers,
        "state_dict_type": "FULL_STATE_DICT",
        # FSDP's own checkpointing of each layer; the Trainer's would gather every layer's weights once more in the
        # backward (transformers warns about it)
        "activation_checkpointing": t.gradient_checkpointing})


def run_arguments(recipe: Recipe, model, dtype: torch.dtype, has_eval: bool, disable_tqdm: bool, pack: bool) -> dict:
    """The TrainingArguments of a run of `model`, whatever its method (SFTConfig and TRL's other configs take them
    all)."""
    t = recipe.train
    every = recipe.evaluation.every_n_steps
    return dict(
        # Checkpoints are written under the staging directory and renamed into the run directory when complete
        # (common.callbacks.CheckpointCallback): a save cut short never looks like a checkpoint to resume from.
        output_dir=str(artifacts.staging_dir(t.output_dir)),
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
        activation_checkpointing=t.gradient_checkpointing and t.fsdp is None,  # FSDP checkpoints its own layers
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        logging_first_step=True,  # the loss at the start is the reference for "is it learning"
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation is ours (artifacts.rotate), after each save is complete
        eval_strategy="steps" if has_eval and every > 0 else "no",  # train.py also evaluates once at the end
        eval_steps=every if has_eval and every > 0 else None,
        # transformers' integrations (W&B, MLflow, ...); TensorBoard writes into the run directory (common.callbacks)
        report_to=trackers.integrations(t.report_to),
        run_name=Path(t.output_dir).name,
        disable_tqdm=disable_tqdm,
        deepspeed=deepspeed_config(t.deepspeed),
        **fsdp_arguments(recipe, model),
        # The Trainer's own token counter (logged as num_input_tokens_seen): padding-free rows hold no padding, so all
        # their tokens count; padded batches count their attention mask.
        include_num_input_tokens_seen="all" if pack else "non_padding",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        save_only_model=False,
    )


def sft_config(recipe: Recipe, model, dtype: torch.dtype, has_eval: bool, disable_tqdm: bool) -> SFTConfig:
    d = recipe.data
    return SFTConfig(
        **run_arguments(recipe, model, dtype, has_eval, disable_tqdm, d.pack),
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
        use_cache=False,
    )


class LabelledSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is taken at labelled positions only (common.loss) where the fast paths allow it, and
    whose logs count the labelled tokens (trained tokens/s in metrics.jsonl)."""

    def __init__(self, *args, fast_paths: FastPaths, **kwargs):
        super().__init__(*args, **kwargs)
        self.fast_paths = fast_paths
        self.labelled_tokens = torch.zeros((), dtype=torch.int64, device=self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy at the positions that carry a label. In SFT most positions are prompt, so this skips most of
        the LM head's work; the loss is the same sum over labelled tokens divided by the same count as TRL's."""
        if self.model.training:
            self.labelled_tokens += labelled_positions(inputs["labels"]).sum()
        if (return_outputs or not self.fast_paths.labelled_loss or self.compute_loss_func is not None
                or self.label_smoother):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        losses = token_losses(model, inputs, self.fast_paths.chunked_loss)
        count = losses.numel() if num_items_in_batch is None else num_items_in_batch
        loss = losses.sum() / torch.as_tensor(count, device=losses.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages, num_items counts every rank
        return loss

    def log(self, logs: dict, start_time=None) -> None:
        if self.model.training and "loss" in logs:  # every rank logs, so the sum over ranks is a collective here
            logs["labelled_tokens"] = int(self.accelerator.reduce(self.labelled_tokens.clone(), reduction="sum"))
        super().log(logs, start_time)


class _PackedRowsHint(logging.Filter):
    """TRL warns that padding-free with batch size 1 gains nothing; our rows arrive already packed, so it does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "padding-free training" not in record.getMessage()


logging.getLogger("trl.trainer.sft_trainer").addFilter(_PackedRowsHint())


def build_trainer(recipe: Recipe, model, fast_paths: FastPaths, tokenizer, train_rows,
                  eval_rows, callbacks: list, dtype: torch.dtype, disable_tqdm: bool) -> LabelledSFTTrainer:
    """train_rows, eval_rows: Datasets (common.dataset) or lists of dicts of input_ids and labels."""
    if not train_rows:
        raise UserError("no training rows: every record was empty or skipped")
    d = recipe.data
    if d.pack:
        train = pack_rows(train_rows, d.max_length, d.shuffle_before_pack, recipe.train.seed)
        evals = pack_rows(eval_rows, d.max_length, False, recipe.train.seed) if eval_rows else None
    else:
        train = as_dataset(train_rows).select_columns(["input_ids", "labels"])
        evals = as_dataset(eval_rows).select_columns(["input_ids", "labels"]) if eval_rows else None
    args = sft_config(recipe, model, dtype, has_eval=evals is not None, disable_tqdm=disable_tqdm)
    trainer = LabelledSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                                 processing_class=tokenizer, callbacks=callbacks, fast_paths=fast_paths)
    use_run_console(trainer)
    return trainer


def use_run_console(trainer) -> None:
    """Our own line logs (callbacks.MetricsCallback) replace the Trainer's dict printing; the tqdm bar stays on a TTY."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from common.callbacks import QuietProgressCallback

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgressCallback)


def save_final(trainer, recipe: Recipe, tokenizer) -> Path:
    """OUTPUT_DIR/final/: adapter (or full model) + tokenizer with its chat template + recipe.yaml, renamed into
    place when complete."""
    run_dir = Path(recipe.train.output_dir)
    final, tmp = run_dir / artifacts.FINAL_DIR, run_dir / f"{artifacts.STAGING_PREFIX}{artifacts.FINAL_DIR}"
    trainer.save_model(str(tmp))  # the tokenizer rides along (processing_class); DDP-safe: rank 0 writes
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        tokenizer.save_pretrained(str(tmp))
        save_recipe(recipe, tmp / artifacts.RECIPE_FILE)
        artifacts.replace_dir(tmp, final)
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)  # the staging dir: TRL's model card is all it holds
    trainer.accelerator.wait_for_everyone()
    return final


def set_chat_template(tokenizer, template) -> None:
    """Saved tokenizers carry the recipe's template as Jinja, so chat/merge/export render prompts exactly as training
    did."""
    tokenizer.chat_template = template.chat_template(tokenizer)
