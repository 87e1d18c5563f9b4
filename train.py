"""Fine-tune a chat model from a YAML recipe: LoRA, QLoRA or full fine-tuning; SFT on TRL's SFTTrainer, preference
tuning on pairs (train.method: dpo | orpo) or on rated answers (kto) on TRL's trainers (common/methods/,
docs/methods.md).

    python train.py RECIPE [section.key=value ...] [--dry-run] [--dump-dataset OUT.jsonl] [--resume auto|PATH] [--force]
    torchrun --nproc_per_node 2 train.py RECIPE        data-parallel (gloo on CPU, NCCL on GPU)
    accelerate launch --multi_gpu --num_processes 2 train.py RECIPE      the same through accelerate (CPU too)

Writes OUTPUT_DIR (train.output_dir): recipe.yaml, train.log, metrics.jsonl, loss.png, runs/ (TensorBoard),
eval_outputs/step_N.txt, checkpoint-N/ and final/ (adapter or model + tokenizer + recipe.yaml); work_dirs/latest
points at it. Ctrl-C saves a checkpoint and exits 130; `--resume auto` continues from the newest checkpoint.
"""
import argparse
import sys
from pathlib import Path

from common.cli import main_guard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.max_length=1024 train.lr=1e-4 lora=null")
    p.add_argument("--dry-run", action="store_true", help="encode the data, print statistics and a sample, and stop")
    p.add_argument("--dump-dataset", metavar="OUT.jsonl", help="write the encoded training rows and stop")
    p.add_argument("--resume", metavar="auto|PATH", help="continue the run: `auto` = its newest checkpoint")
    p.add_argument("--force", action="store_true", help="start over in an OUTPUT_DIR that holds an earlier run")
    args = p.parse_intermixed_args(argv)  # overrides may follow the flags
    if args.force and args.resume:
        p.error("--force starts the run over and --resume continues it: pick one")
    return args


def summary(recipe, trainer, precision, data_lines: list[str], fast_paths, resume) -> str:
    from common.modeling import parameter_counts

    trainable, total = parameter_counts(trainer.model)
    m, t = recipe.model, recipe.train
    kind = "full fine-tuning" if recipe.lora is None else f"{'QLoRA' if m.quantization else 'LoRA'} " + (
        f"continuing the adapter {m.adapter}" if m.adapter else
        f"r={recipe.lora.r} alpha={recipe.lora.alpha} on {recipe.lora.target_modules}")
    world = trainer.args.world_size
    lines = [f"model: {m.path} ({precision.name}{', ' + m.quantization if m.quantization else ''}), {kind}",
             f"precision: {precision.reason}",
             f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
             f"method: {t.method}",
             *data_lines,
             f"fast paths: {', '.join(fast_paths.names()) or 'none (TRL and PEFT as they come)'}",
             f"effective batch size: {t.batch_size} x {t.grad_accum} accumulation x {world} process(es) = "
             f"{t.batch_size * t.grad_accum * world} rows/step",
             f"schedule: {'max_steps ' + str(t.max_steps) if t.max_steps > 0 else f'{t.epochs} epoch(s)'}, lr {t.lr}, "
             f"{t.scheduler} after {t.warmup_ratio:.0%} warmup, save every {t.save_steps} (keep {t.save_total_limit})"]
    if t.fsdp:
        layers = ", ".join(trainer.args.fsdp_config["transformer_layer_cls_to_wrap"])
        lines.append(f"sharding: FSDP2 {t.fsdp} over {world} processes, one unit per {layers}")
    elif t.deepspeed:
        lines.append(f"sharding: DeepSpeed {t.deepspeed} over {world} processes")
    if resume:
        lines.append(f"resuming from {resume}")
    return "\n".join(lines)


@main_guard
def main(argv=None, extra_callbacks=()) -> int:
    """extra_callbacks: more TrainerCallbacks for the run, called before its own (the bench's step timer)."""
    args = parse_args(argv)
    import datasets

    from common import artifacts
    from common.methods import table as methods
    from common.modeling import recipe_tokenizer
    datasets.disable_progress_bars()  # per-map bars drown the run's own log lines
    # every recipe problem at once, and what this machine cannot do (unless only the data is asked for)
    recipe = methods.load_recipe(args.recipe, args.overrides, check_machine=not (args.dry_run or args.dump_dataset))
    tokenizer = recipe_tokenizer(recipe)
    method = methods.get(recipe.train.method)  # its data, dry run, summary and trainer (common/methods/)
    train_rows, eval_rows, stats = method.build_datasets(recipe, tokenizer)
    if args.dry_run:
        method.print_dry_run(recipe, tokenizer, train_rows, stats)
        return 0
    if args.dump_dataset:
        artifacts.check_output(Path(args.dump_dataset), [], args.force)
        method.dump_dataset(train_rows, args.dump_dataset)
        return 0

    from transformers import set_seed

    from common import acceleration
    from common.callbacks import InterruptCallback, RunLog, is_main_process, run_callbacks
    from common.modeling import load_model
    from common.precision import resolve
    from common.recipe import save_recipe, to_dict
    from common.templates import get_template
    from common.trackers import TrackerCallback
    from common.training import save_final, set_chat_template

    precision = resolve(recipe.model.dtype)
    run_dir = Path(recipe.train.output_dir)
    if is_main_process():
        artifacts.prepare_run_dir(run_dir, resuming=args.resume is not None, force=args.force)
        save_recipe(recipe, run_dir / artifacts.RECIPE_FILE)
    resume = artifacts.resolve_resume(run_dir, args.resume)
    log = RunLog(run_dir)
    if precision.warning:
        log(f"warning: {precision.warning}")
    set_seed(recipe.train.seed)  # LoRA's random init comes before the Trainer seeds anything
    model = load_model(recipe, precision.dtype)
    fast_paths = acceleration.apply(model, recipe)
    template = get_template(recipe.data.template, recipe.data.thinking)
    set_chat_template(tokenizer, template)
    interrupt = InterruptCallback(log)
    info = {"recipe": to_dict(recipe), "precision": {"dtype": precision.name, "reason": precision.reason},
            "dataset": stats}
    tracker = TrackerCallback(recipe.train.report_to, info, recipe.train.report_answers)
    callbacks = list(extra_callbacks) + run_callbacks(recipe, run_dir, log, interrupt, tokenizer, template, tracker)
    trainer = method.build_trainer(recipe, model, fast_paths, tokenizer, train_rows, eval_rows, callbacks,
                                   precision.dtype, disable_tqdm=not sys.stderr.isatty())
    log(summary(recipe, trainer, precision, method.summary_lines(recipe, stats), fast_paths, resume))

    try:
        with artifacts.writing_run(run_dir):  # a full disk mid-save: one line naming the checkpoint
            trainer.train(resume_from_checkpoint=resume)
    finally:
        interrupt.restore_handlers()
    if interrupt.signal:
        log(f"stopped at step {trainer.state.global_step}; continue with: python train.py {args.recipe} "
            f"{' '.join(args.overrides)} --resume auto".replace("  ", " "))
        return interrupt.exit_code
    step = trainer.state.global_step
    if eval_rows and not any("eval_loss" in h and h.get("step") == step for h in trainer.state.log_history):
        trainer.evaluate()  # the final model's eval loss, unless the schedule just computed it
    with artifacts.writing_run(run_dir):
        final = save_final(trainer, recipe, tokenizer)
    if is_main_process():
        artifacts.set_latest(run_dir)
    log(f"done: {trainer.state.global_step} steps; final adapter/model in {final}; metrics in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
