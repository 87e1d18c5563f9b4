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
    judge = p.add_argument_group("a judge's verdict: rubric scores and win rate (docs/evaluation.md#judged-by-a-model)")
    judge.add_argument("--judge", metavar="URL", help="an OpenAI-compatible endpoint's base URL (vLLM, Ollama, a cloud "
                       "API, chat.py --serve), e.g. http://127.0.0.1:8000/v1: both models answer every counsellor turn "
                       "of the held-out conversations, the judge scores each reply and compares each pair")
    judge.add_argument("--judge-model", metavar="NAME", help="the judge model's name there (default: the first it lists)")
    judge.add_argument("--judge-rubric", metavar="FILE", default="data/counselling_rubric.json", help="(default %(default)s)")
    judge.add_argument("--judge-key-file", metavar="PATH", help="a file holding the endpoint's API key")
    judge.add_argument("--judge-key-env", metavar="VAR", help="or an environment variable holding it")
    judge.add_argument("--judge-limit", type=int, default=8, metavar="N", help="held-out conversations judged, every "
                       "counsellor turn of each (default 8)")
    judge.add_argument("--judge-in-flight", type=int, default=4, metavar="N", help="requests at once (default 4)")
    judge.add_argument("--judge-timeout", type=float, default=120.0, metavar="SECONDS", help="per request (default 120)")
    judge.add_argument("--judge-max-tokens", type=int, default=400, metavar="N", help="the judge's reply (default 400)")
    judge.add_argument("--judge-cache", metavar="DIR", help="verdicts kept on disk, so that a rerun asks nothing twice "
                       "(default: RUN/judge_cache)")
    return p.parse_args(argv)


def judge_client(args, report_dir: Path):
    """The judge's client (common/judge.py), every check that can fail made now, before any model loads: the address
    answering, the rubric file, the key."""
    from types import SimpleNamespace

    from common.judge import JudgeClient

    # The fields JudgeClient.from_settings reads (the GRPO `judge` reward's settings have the same names).
    settings = SimpleNamespace(url=args.judge, model=args.judge_model, rubric=args.judge_rubric, retries=2,
                               api_key_file=args.judge_key_file, api_key_env=args.judge_key_env,
                               max_in_flight=args.judge_in_flight, timeout=args.judge_timeout,
                               max_tokens=args.judge_max_tokens,
                               cache=str(args.judge_cache or report_dir.parent / "judge_cache"))
    return JudgeClient.from_settings(settings, log=lambda line: print(line, file=sys.stderr))


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

    from common import artifacts, benchmarks, evaluation, judging
    from common.pairs import as_conversations
    from common.precision import canonical

    disable_progress_bars()  # packing's Map bar; the scoring and answering bars are eval's own
    tasks = benchmarks.tasks(args.tasks) if args.tasks else None  # lm-eval present, the tasks known: before any load
    source = artifacts.resolve_model(args.model, adapter_first=True)
    other = artifacts.resolve_model(args.compare, adapter_first=True) if args.compare else None
    out = args.out or (source.run_dir or source.adapter or source.model) / artifacts.EVAL_DIR
    artifacts.check_output(out, [], args.force)
    client = judge_client(args, out) if args.judge else None
    files, records = held_out(args, source)
    progress = sys.stderr.isatty()
    models = evaluation.Contestants(source, other, canonical(args.torch_dtype))
    result = evaluation.evaluate(models, source.recipe, records, files, args.limit, args.max_new_tokens,
                                 args.temperature, progress)
    if tasks:
        result.benchmarks = benchmarks.run(models, tasks, args.task_limit, args.task_batch_size)
    if client:
        result.judged = judging.run(models, client, source.recipe, as_conversations(records), args.judge_limit,
                                    args.max_new_tokens, args.temperature, progress)
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
