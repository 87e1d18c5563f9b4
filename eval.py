"""Did fine-tuning help? Held-out loss and answers side by side, base vs tuned.

    python eval.py                                    # latest run: its final/ adapter vs the base (adapter off)
    python eval.py work_dirs/demo_smollm2 --data held_out.json --limit 4
    python eval.py RUN --compare work_dirs/other_run  # another run or checkpoint instead of the base

Held-out data: --data, else the run's data.eval_path, else the conversations its data.eval_fraction held out. Loss
is scored on the answer tokens exactly as training scores them (the run's template, masks, truncation and
max_length). Answers: the run's evaluation.prompts and the first user turn of up to --limit held-out conversations,
greedy by default, through the same generation core as chat.py. Preference pairs (a DPO/ORPO run's data, or any pair
file): also the preference accuracy and mean margin, and the loss is that of the chosen answers. --tasks: also
lm-evaluation-harness tasks (its names, or YAML task files of your own), base vs tuned, to see what was forgotten.
Writes RUN/eval/report.md and report.json.
"""
import argparse
import sys
from pathlib import Path

from common.cli import main_guard


def parse_args(argv=None):
    from common.precision import CHOICES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="run, adapter or checkpoint directory (default: the latest run)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="held-out conversations or preference pairs (any format "
                   "train.py reads)")
    p.add_argument("--limit", type=int, default=8, help="held-out conversations whose first turn is answered (default 8)")
    p.add_argument("--compare", metavar="OTHER", help="compare with this run, checkpoint or model instead of the base")
    p.add_argument("--max-new-tokens", type=int, help="answer length (default: the run's evaluation.max_new_tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--torch-dtype", default="auto", choices=CHOICES, help="auto: by the hardware, as in training")
    p.add_argument("--out", type=Path, help="report directory (default: RUN/eval)")
    p.add_argument("--force", action="store_true", help="replace an existing report directory")
    bench = p.add_argument_group("forgetting: lm-evaluation-harness (pip install lm-eval; "
                                 "docs/evaluation.md#forgetting-lm-evaluation-harness)")
    bench.add_argument("--tasks", nargs="+", metavar="TASK", help="lm-eval task names (their data comes from the hub) "
                       "or YAML task files (e.g. a task over local JSON), scored for base and tuned")
    bench.add_argument("--task-limit", type=int, metavar="N", help="at most N examples per task (lm-eval's --limit)")
    bench.add_argument("--task-batch-size", type=int, default=8, metavar="N", help="(default 8)")
    return p.parse_args(argv)


def held_out(args, source):
    """(files named, held-out records) for this evaluation: conversations, or preference pairs (common.pairs)."""
    from common.cli import UserError
    from common.dataset import recipe_conversations
    from common.methods.table import loader_for

    d = source.recipe.data
    if args.data or d.eval_paths:
        files = args.data or d.eval_paths
        return files, loader_for(files)(files, d.format, d.on_bad_record)
    if d.eval_fraction:  # the same draw training made
        held = recipe_conversations(source.recipe, load=loader_for(d.paths))[1]
        return [f"{p} (the {d.eval_fraction:.0%} held out)" for p in d.paths], held
    raise UserError(f"{source.name}: no held-out data (the run sets neither data.eval_path nor data.eval_fraction); "
                    "pass --data FILE")


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    from datasets import disable_progress_bars

    from common import artifacts, benchmarks, evaluation
    from common.precision import canonical

    disable_progress_bars()  # packing's Map bar; the scoring and answering bars are eval's own
    tasks = benchmarks.tasks(args.tasks) if args.tasks else None  # lm-eval present, the tasks known: before any load
    source = artifacts.resolve_model(args.model, adapter_first=True)
    other = artifacts.resolve_model(args.compare, adapter_first=True) if args.compare else None
    out = args.out or (source.run_dir or source.adapter or source.model) / artifacts.EVAL_DIR
    artifacts.check_output(out, [], args.force)
    files, records = held_out(args, source)
    progress = sys.stderr.isatty()
    models = evaluation.Contestants(source, other, canonical(args.torch_dtype))
    result = evaluation.evaluate(models, source.recipe, records, files, args.limit, args.max_new_tokens,
                                 args.temperature, progress)
    if tasks:
        result.benchmarks = benchmarks.run(models, tasks, args.task_limit, args.task_batch_size)
    with artifacts.atomic_dir(out) as tmp:
        evaluation.write_report(tmp, result)
    print(evaluation.summary(result))
    if result.answers:
        first = result.answers[0]
        print(f"\nQ: {first['prompt']}\nbase:  {first['base']}\ntuned: {first['tuned']}")
    print(f"\nreport: {out / 'report.md'} (and report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
