"""Did fine-tuning help? Held-out loss and answers side by side, base vs tuned.

    python eval.py                                    # latest run: its final/ adapter vs the base (adapter off)
    python eval.py work_dirs/demo_smollm2 --data held_out.json --limit 4
    python eval.py RUN --compare work_dirs/other_run  # another run or checkpoint instead of the base

Held-out data: --data, else the run's data.eval_path, else the conversations its data.eval_fraction held out. Loss
is scored on the answer tokens exactly as training scores them (the run's template, masks, truncation and
max_length). Answers: the run's evaluation.prompts and the first user turn of up to --limit held-out conversations,
greedy by default, through the same generation core as chat.py. Preference pairs (a DPO/ORPO run's data, or any pair
file): also the preference accuracy and mean margin, and the loss is that of the chosen answers. Writes
RUN/eval/report.md and report.json.
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
    return p.parse_args(argv)


def held_out(args, source):
    """(files named, held-out records) for this evaluation: conversations, or preference pairs (common.pairs)."""
    from common.cli import UserError
    from common.dataset import recipe_conversations
    from common.pairs import loader_for

    d = source.recipe.data if source.recipe else None
    if args.data or (d and d.eval_paths):
        files = args.data or d.eval_paths
        return files, loader_for(files)(files, d.format if d else "auto", d.on_bad_record if d else "error")
    if d and d.eval_fraction:  # the same draw training made
        held = recipe_conversations(source.recipe, load=loader_for(d.paths))[1]
        return [f"{p} (the {d.eval_fraction:.0%} held out)" for p in d.paths], held
    raise UserError(f"{source.name}: no held-out data (the run sets neither data.eval_path nor data.eval_fraction); "
                    "pass --data FILE")


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from common import artifacts, evaluation, preference
    from common.pairs import as_conversations, encode_pairs
    from common.generation import Generator, Sampling, context_length
    from common.precision import canonical
    from common.recipe import DataConfig, EvaluationConfig
    from common.samples import Stats, make_samples, with_system
    from common.templates import get_template

    source = artifacts.resolve_model(args.model, adapter_first=True)
    other = artifacts.resolve_model(args.compare, adapter_first=True) if args.compare else None
    out = args.out or (source.run_dir or source.adapter or source.model) / artifacts.EVAL_DIR
    artifacts.check_output(out, [], args.force)
    files, records = held_out(args, source)
    pairs, conversations = preference.pairs_of(records), as_conversations(records)  # a pair scores its chosen answer
    d = source.recipe.data if source.recipe else DataConfig(template="tokenizer")
    cfg = source.recipe.evaluation if source.recipe else EvaluationConfig()
    template = get_template(d.template)
    models = evaluation.Contestants(source, other, canonical(args.torch_dtype))
    tokenizer, progress = models.tokenizer, sys.stderr.isatty()
    max_length = context_length(source.recipe, models.model.config)

    # Held-out loss: the samples training would make of these conversations, packed into rows of max_length.
    samples, stats = [], Stats()
    for n, turns in enumerate(conversations):
        for ids, labels in make_samples(tokenizer, template, with_system(turns, d.system), max_length, d.truncation, stats):
            samples.append((n, ids, labels))
    rows = [evaluation.row_inputs(row) for row in evaluation.pack(samples, max_length)]
    scores, pair_rows, preferences = {}, encode_pairs(pairs, tokenizer, template, max_length, d.system)[0], {}
    for who in ("base", "tuned"):
        with models.use(who) as model:
            scores[who] = evaluation.score(model, rows, len(conversations), progress, who)
            preferences[who] = preference.preference_accuracy(model, pair_rows) if pair_rows else None

    # Answers, side by side, through the generation core.
    sampling = Sampling.from_evaluation(cfg, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    system = [{"role": "system", "content": d.system}] if d.system else []
    prompts = [(p, "evaluation.prompts") for p in cfg.prompts] + [
        (turns[0].input, f"held-out conversation {n}") for n, turns in enumerate(conversations[: max(args.limit, 0)])]
    answers = [{"prompt": p, "source": where} for p, where in prompts]
    for who in ("base", "tuned"):
        with models.use(who) as model:
            generator = Generator(model, tokenizer, template, max_length)
            for a in tqdm(answers, desc=f"answering {who}", disable=not progress, leave=False):
                completion = generator.generate(system + [{"role": "user", "content": a["prompt"]}], sampling)
                a[who], a[f"{who}_stop"], a[f"{who}_facts"] = completion.text, completion.ended_by, evaluation.answer_facts(completion)

    base, tuned = scores["base"], scores["tuned"]
    per = [{"index": n, "tokens": tuned.tokens[n], "base_loss": base.loss_sum[n] / max(base.tokens[n], 1),
            "tuned_loss": tuned.loss_sum[n] / max(tuned.tokens[n], 1)} for n in range(len(conversations)) if tuned.tokens[n]]
    better = sum(c["tuned_loss"] < c["base_loss"] for c in per)
    result = {"tuned_name": models.names["tuned"], "base_name": models.names["base"], "data": [str(f) for f in files],
              "conversations": len(per), "base": base.summary(), "tuned": tuned.summary(), "tuned_better": better,
              "tuned_better_share": round(better / max(len(per), 1), 4), "per_conversation": per, "answers": answers,
              "settings": {"template": template.name, "truncation": d.truncation, "max_length": max_length,
                           "system": d.system, "samples": len(samples), "rows": len(rows),
                           "sampling": ("greedy" if sampling.temperature == 0 else f"temperature {sampling.temperature}")
                           + f", max_new_tokens {sampling.max_new_tokens}"}}
    if pair_rows:
        result["preference"] = preference.compare(preferences["base"], preferences["tuned"])
    with artifacts.atomic_dir(out) as tmp:
        evaluation.write_report(tmp, result)
    print(evaluation.summary(result))
    if pair_rows:
        print(preference.summary(result["preference"]))
    first = answers[0] if answers else None
    if first:
        print(f"\nQ: {first['prompt']}\nbase:  {first['base']}\ntuned: {first['tuned']}")
    print(f"\nreport: {out / 'report.md'} (and report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
