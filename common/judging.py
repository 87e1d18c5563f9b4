"""Did the counselling get better? eval.py --judge: a judge model scores base and tuned replies on a rubric, and
says which of the two is better with their order swapped (common/judge.py is the client, its cache and its rubric;
this module is the evaluation around it).

- Points to answer: each counsellor turn of the held-out conversations. At a point both models answer the same
  context, the record's own earlier turns (oldest dropped where the context would not hold them), through the
  generation core, in batches (common.decoding).
- Rubric: the judge scores every reply on every dimension; per dimension the mean for base and tuned with a 95%
  bootstrap interval over the points, and how many replies were judged and lost (a reply the judge did not score in
  the expected form, or a request that failed).
- Pairwise: the judge sees both replies twice, base first and tuned first (PAIRWISE, a prompt of this module beside
  the rubric's); win / tie / loss of tuned over base with an interval, and how often the verdict changed with the
  order (its position bias), reported.
- Every verdict goes through the judge's disk cache: an evaluation killed and run again asks nothing twice (greedy
  answers are the same answers; sampled ones are seeded per point).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Optional

from common.cli import UserError

WHO = ("base", "tuned")
LEVEL = 0.95
RESAMPLES = 2000
WORST_SHOWN = 3  # the lowest-scored replies shown in report.md beside the other model's answer
BATCH = 8  # answers decoded together
PAIRWISE = """You compare two replies of a counselling assistant to the same conversation: Reply A and Reply B, given
together as the reply to rate. Judge them on these dimensions: {dimensions}. The order of the two replies says nothing
about their quality. Answer with one JSON object and nothing else: {{"better": "A", "reason": "..."}}, with "better"
one of "A", "B" or "tie" and a short reason."""


# ---------------------------------------------------------------- the pairwise question

@dataclass(frozen=True)
class Pairwise:
    """The rubric's dimensions asked as one question about two replies. It stands where common.judge.JudgeClient
    takes a Rubric (name, digest, system_prompt, parse), so that pairwise verdicts go through the same client:
    requests in flight, retries, counts and the disk cache (its own file: the digest covers this prompt)."""

    rubric: object  # common.judge.Rubric

    @property
    def name(self) -> str:
        return f"{self.rubric.name}-pairwise"

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.rubric.digest}\n{PAIRWISE}".encode()).hexdigest()

    def system_prompt(self) -> str:
        return PAIRWISE.format(dimensions="; ".join(f"{d.name} ({d.description})" for d in self.rubric.dimensions))

    @staticmethod
    def parse(reply: str) -> Optional[dict]:
        """{"better": "A" | "B" | "tie", "reason"} from the last JSON object in the reply that holds one; None if none."""
        for match in reversed(list(re.finditer(r"\{[^{}]*\}", reply or ""))):
            try:
                data = json.loads(match.group(0))
            except ValueError:
                continue
            better = str(data.get("better", "")).strip().lower() if isinstance(data, dict) else ""
            if better in ("a", "b", "tie"):
                return {"better": "tie" if better == "tie" else better.upper(), "reason": str(data.get("reason", ""))}
        return None


def two_replies(first: str, second: str) -> str:
    return f"Reply A:\n{first}\n\nReply B:\n{second}"


def pairwise_client(client):
    """A client for pairwise verdicts beside the rubric's `client`: the same endpoint, model, key and settings."""
    from common.judge import JudgeClient

    cache = client.cache_path.parent if client.cache_path is not None else None
    return JudgeClient(client.url, client.model, Pairwise(client.rubric), client.key, client.max_in_flight,
                       client.timeout, client.retries, cache, client.max_tokens, client.log)


# ---------------------------------------------------------------- statistics

def bootstrap(values: list[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> tuple:
    """The percentile bootstrap interval of the mean: (low, high), None for no values."""
    import numpy as np

    if not values:
        return None, None
    x = np.asarray(values, dtype=float)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return round(float(low), 4), round(float(high), 4)


def summarise(values: list[float]) -> dict:
    low, high = bootstrap(values)
    return {"mean": round(sum(values) / len(values), 4) if values else None, "low": low, "high": high, "n": len(values)}


# ---------------------------------------------------------------- points and answers

@dataclass
class Point:
    conversation: int  # index among the held-out conversations
    turn: int  # the counsellor's turn answered, from 0
    messages: list  # the context both models answer: system, the record's earlier turns, the user's message
    reference: str  # what the record's counsellor said
    dropped: int = 0  # earlier turns left out to fit the context


def points(generator, sampling, conversations: list, system: Optional[str], limit: int) -> tuple[list[Point], int]:
    """The counsellor turns of up to `limit` conversations, each with its context fitted to the model's (the oldest
    turns dropped, as the chat does), and how many turns were left out because the client's message alone does not
    fit."""
    from common.generation import PromptTooLong
    from common.repl import ChatSession

    out, too_long = [], 0
    for n, turns in enumerate(conversations[: max(limit, 0)]):
        for k, turn in enumerate(turns):
            if not turn.output:
                continue
            history = [m for t in turns[:k] for m in ({"role": "user", "content": t.input},
                                                      {"role": "assistant", "content": t.output or ""})]
            session = ChatSession(generator, sampling, turns[0].system or system, history)
            try:
                messages, dropped = session.fit(turn.input)
            except PromptTooLong:
                too_long += 1
                continue
            out.append(Point(n, k, messages, turn.output, dropped))
    return out, too_long


def answer_points(models, template, max_length: int, todo: list[Point], sampling, progress: bool = False) -> dict:
    """{"base": [text], "tuned": [text]}: both models' answers at every point, decoded BATCH at a time."""
    import dataclasses

    from tqdm.auto import tqdm

    from common.decoding import Decoder
    from common.generation import GREEDY_BELOW, Generator

    answers = {}
    for who in WHO:
        with models.use(who) as model:
            generator = Generator(model, models.tokenizer, template, max_length)
            # A sampled answer is seeded by its point: a rerun gives the same answers, which the judge has cached.
            pending = [generator.start(p.messages, sampling if sampling.temperature < GREEDY_BELOW else
                                       dataclasses.replace(sampling, seed=(sampling.seed or 0) + i))
                       for i, p in enumerate(todo)]
            with tqdm(total=len(todo), desc=f"answering {who}", disable=not progress, leave=False) as bar:
                for _ in Decoder(model).run_all([a.row for a in pending], BATCH):
                    bar.update()
            answers[who] = [a.completion().text for a in pending]
    return answers


# ---------------------------------------------------------------- judging

def judge(client, todo: list[Point], answers: dict) -> dict:
    """The rubric verdicts of every reply and the pairwise verdicts in both orders, summarised (see the module)."""
    pair_client = pairwise_client(client)
    verdicts = {who: client.verdicts([p.messages for p in todo], answers[who]) for who in WHO}
    contexts = [p.messages for p in todo] * 2
    pairs = pair_client.verdicts(contexts, [two_replies(b, t) for b, t in zip(answers["base"], answers["tuned"])]
                                 + [two_replies(t, b) for b, t in zip(answers["base"], answers["tuned"])])
    base_first, tuned_first = pairs[: len(todo)], pairs[len(todo):]
    dims = [d.name for d in client.rubric.dimensions]
    rubric = {d: {who: summarise([v["scores"][d] for v in verdicts[who] if v]) for who in WHO} for d in dims}
    rubric["mean of dimensions"] = {who: summarise([sum(v["scores"].values()) / len(dims) for v in verdicts[who] if v])
                                    for who in WHO}
    replies = []
    for i, p in enumerate(todo):
        row = {"conversation": p.conversation, "turn": p.turn, "client": p.messages[-1]["content"],
               "reference": p.reference, "context_turns_dropped": p.dropped}
        for who in WHO:
            v = verdicts[who][i]
            row[who] = answers[who][i]
            row[f"{who}_scores"] = v["scores"] if v else None
            row[f"{who}_reason"] = v["reason"] if v else None
        row["pairwise"] = {"base_first": _better(base_first[i], "base", "tuned"),
                           "tuned_first": _better(tuned_first[i], "tuned", "base"),
                           "base_first_reason": base_first[i]["reason"] if base_first[i] else None,
                           "tuned_first_reason": tuned_first[i]["reason"] if tuned_first[i] else None}
        replies.append(row)
    return {"judge": {"url": client.url, "model": client.model, "rubric": client.rubric.name,
                      "scale": [client.rubric.low, client.rubric.high]},
            "points": len(todo),
            "judged": {who: sum(v is not None for v in verdicts[who]) for who in WHO},
            "lost": {who: sum(v is None for v in verdicts[who]) for who in WHO},
            "rubric": rubric, "pairwise": pairwise([r["pairwise"] for r in replies]),
            "requests": {"rubric": dict(client.counts), "pairwise": dict(pair_client.counts)},
            "replies": replies}


def _better(verdict: Optional[dict], a: str, b: str) -> Optional[str]:
    """A pairwise verdict as the model it prefers (`a` was shown as Reply A), "tie", or None (no verdict)."""
    if verdict is None:
        return None
    return {"A": a, "B": b, "tie": "tie"}[verdict["better"]]


def pairwise(verdicts: list[dict]) -> dict:
    """Win / tie / loss of tuned over base over the points with both orders judged: a win where tuned is preferred in
    one order and not beaten in the other, a loss the same for base, a tie otherwise (a verdict that flipped with the
    order included). The flip rate: the share of those points where the two orders gave different verdicts; the
    first-reply rate: the share of verdicts that preferred whichever reply was shown first."""
    both = [(v["base_first"], v["tuned_first"]) for v in verdicts if v["base_first"] and v["tuned_first"]]
    outcomes = []
    for x, y in both:
        if "tuned" in (x, y) and "base" not in (x, y):
            outcomes.append(1.0)
        elif "base" in (x, y) and "tuned" not in (x, y):
            outcomes.append(0.0)
        else:
            outcomes.append(0.5)
    first = [x == "base" for x, _ in both] + [y == "tuned" for _, y in both]
    win_rate = summarise(outcomes)  # a tie counts half
    return {"n": len(both), "lost": len(verdicts) - len(both), "win": outcomes.count(1.0), "tie": outcomes.count(0.5),
            "loss": outcomes.count(0.0), "win_rate": win_rate["mean"], "low": win_rate["low"], "high": win_rate["high"],
            "flip_rate": round(sum(x != y for x, y in both) / len(both), 4) if both else None,
            "first_preferred": round(sum(first) / len(first), 4) if first else None}


# ---------------------------------------------------------------- eval.py's part

def run(models, client, recipe, conversations: list, limit: int, max_new_tokens: Optional[int] = None,
        temperature: float = 0.0, progress: bool = False) -> dict:
    """Answer every point of up to `limit` held-out conversations with both models, and judge them."""
    from common.generation import Generator, Sampling
    from common.templates import get_template

    d = recipe.data
    template = get_template(d.template)
    sampling = Sampling.from_evaluation(recipe.evaluation, max_new_tokens=max_new_tokens, temperature=temperature)
    todo, too_long = points(Generator(models.model, models.tokenizer, template, d.max_length), sampling, conversations,
                            d.system, limit)
    if not todo:
        raise UserError(f"--judge: the held-out conversations have no counsellor turn to answer that fits the context"
                        f" ({too_long} too long)")
    result = judge(client, todo, answer_points(models, template, d.max_length, todo, sampling, progress))
    result["too_long"] = too_long
    result["sampling"] = f"{'greedy' if sampling.temperature == 0 else f'temperature {sampling.temperature}'}, " \
                         f"max_new_tokens {sampling.max_new_tokens}"
    return result


def _interval(s: dict) -> str:
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"


def markdown(judged: dict) -> list[str]:
    """The rubric table, the pairwise line and the worst-scored replies beside the other model's answer."""
    j, pw = judged["judge"], judged["pairwise"]
    lines = ["", f"## Judged ({j['model']} at {j['url']}, rubric `{j['rubric']}`, scores {j['scale'][0]}-{j['scale'][1]})",
             "", f"{judged['points']} counsellor turns answered by both models ({judged['sampling']}"
             + (f"; {judged['too_long']} left out, the client's message alone longer than the context" if judged['too_long'] else "")
             + f"); judged "
             f"{judged['judged']['base']} base and {judged['judged']['tuned']} tuned replies, lost "
             f"{judged['lost']['base']} and {judged['lost']['tuned']} (no score in the expected form, or the request "
             "failed). Means with 95% bootstrap intervals.", "",
             "| dimension | base | tuned |", "|---|---|---|"]
    for dim, s in judged["rubric"].items():
        lines.append(f"| {dim} | {_interval(s['base'])} | {_interval(s['tuned'])} |")
    lines += [""]
    if pw["n"]:
        lines += [f"Pairwise, both orders, {pw['n']} turns: tuned wins {pw['win']}, ties {pw['tie']}, loses "
                  f"{pw['loss']}; win rate {pw['win_rate']:.2f} [{pw['low']:.2f}, {pw['high']:.2f}] (a tie counts "
                  f"half). The verdict flipped with the order on {100 * pw['flip_rate']:.0f}% of the turns; the reply "
                  f"shown first was preferred in {100 * pw['first_preferred']:.0f}% of the verdicts"
                  + (" (the judge's position bias: weigh the win rate accordingly)." if pw["flip_rate"] >= 0.25 else ".")
                  + (f" {pw['lost']} turns lost a verdict." if pw["lost"] else "")]
    else:
        lines += [f"Pairwise: no turn got a verdict in both orders ({pw['lost']} lost)."]
    worst = sorted(((sum(r[f"{who}_scores"].values()) / len(r[f"{who}_scores"]), who, r) for r in judged["replies"]
                    for who in WHO if r[f"{who}_scores"]), key=lambda x: x[0])[:WORST_SHOWN]
    if worst:
        lines += ["", "### Lowest-scored replies", ""]
    for score, who, r in worst:
        other = "tuned" if who == "base" else "base"
        scores = ", ".join(f"{k} {v}" for k, v in r[f"{who}_scores"].items())
        lines += [f"**{who}**, conversation {r['conversation']} turn {r['turn']} — mean {score:.2f} ({scores}); "
                  f"the judge: {r[f'{who}_reason'] or '(no reason)'}", "",
                  "> client: " + r["client"].replace("\n", "\n> "), ">",
                  f"> {who}: " + (r[who] or "(empty)").replace("\n", "\n> "), ">",
                  f"> {other}: " + (r[other] or "(empty)").replace("\n", "\n> "), ""]
    return lines


def summary(judged: dict) -> str:
    total = judged["rubric"]["mean of dimensions"]
    pw = judged["pairwise"]
    text = (f"judged by {judged['judge']['model']}: rubric mean base {_interval(total['base'])} -> tuned "
            f"{_interval(total['tuned'])}; lost {judged['lost']['base']} + {judged['lost']['tuned']} of "
            f"{2 * judged['points']} replies")
    if pw["n"]:
        text += (f"\npairwise over {pw['n']} turns: tuned wins {pw['win']}, ties {pw['tie']}, loses {pw['loss']} "
                 f"(win rate {pw['win_rate']:.2f} [{pw['low']:.2f}, {pw['high']:.2f}]); verdict flipped with the "
                 f"order on {100 * pw['flip_rate']:.0f}%")
    return text
