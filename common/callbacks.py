"""Trainer callbacks: what every training run does, whatever its trainer (SFT, DPO): run log + metrics + plot,
TensorBoard, checkpoints completed in place, evaluation prompts (XTuner's EvaluateChatHook), Ctrl-C handling.
`run_callbacks` puts them together; they use the Trainer's public callback events only."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from common import artifacts
from common.artifacts import EVAL_OUTPUTS_DIR, LOG_FILE, METRICS_FILE, PLOT_FILE, atomic_file, write_text


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate (both set RANK), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


class RunLog:
    """Timestamped lines to OUTPUT_DIR/train.log; on the console through tqdm on a TTY (so the bar survives),
    plain timestamped lines otherwise (nohup, screen logs). Silent on non-main ranks."""

    def __init__(self, run_dir: str | Path, enabled: bool | None = None):
        self.path = Path(run_dir) / LOG_FILE
        self.enabled = is_main_process() if enabled is None else enabled
        self.tty = sys.stdout.isatty()

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        lines = [f"[{stamp}] {line}" for line in str(text).splitlines() or [""]]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        if self.tty:
            from tqdm.auto import tqdm

            tqdm.write(str(text))
        else:
            print("\n".join(lines), flush=True)


class QuietProgressCallback(ProgressCallback):
    """The tqdm bar without its dict dumps: MetricsCallback prints the log lines."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def plot_metrics(run_dir: str | Path) -> Path | None:
    """loss (and eval loss) and lr against step, from metrics.jsonl, into loss.png (written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    train, evals = {}, {}
    if not (run_dir / METRICS_FILE).is_file():
        return None
    for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short when an earlier run was killed mid-write
            continue
        if "loss" in row:  # a resumed run re-logs steps after its checkpoint: the newest entry wins
            train[row["step"]] = row
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
    if not train and not evals:
        return None
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = sorted(train)
    ax.plot(steps, [train[s]["loss"] for s in steps], label="train loss", color="tab:blue")
    if evals:
        ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", label="eval loss", color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [train[s].get("lr", 0.0) for s in steps], label="lr", color="tab:orange", alpha=0.6)
    lr_ax.set_ylabel("lr")
    lr_ax.legend(loc="upper right")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    with atomic_file(run_dir / PLOT_FILE) as tmp:
        fig.savefig(tmp, dpi=100)
    return run_dir / PLOT_FILE


class MetricsCallback(TrainerCallback):
    """metrics.jsonl (step, loss, lr, grad_norm, tokens/s, elapsed; rewards and log-probs of preference runs), one log
    line per logging step, and loss.png refreshed at every save and at the end. Main process only."""

    # What the other trainers log beside the loss (TRL's names): rewards/{chosen,rejected,margins,accuracies},
    # logps/{chosen,rejected}, ORPO's nll_loss and log_odds_{ratio,chosen}, KTO's kl; GRPO's reward (the weighted sum),
    # reward_std, rewards/NAME/{mean,std}, completions/*, kl, entropy, clip_ratio/*, frac_reward_zero_std; also their
    # eval_ forms.
    METHOD_METRICS = ("rewards/", "logps/", "nll_loss", "log_odds_", "reward", "completions/", "kl", "entropy",
                      "clip_ratio", "frac_reward_zero_std")

    def __init__(self, run_dir: str | Path, log: RunLog):
        self.run_dir, self.log = Path(run_dir), log
        self.start = self.last_time = time.time()
        self.last_counts: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.time()
        # A resumed run's counters start where its checkpoint left them.
        self.last_counts = {"tokens_per_s": float(state.num_input_tokens_seen or 0)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            # The Trainer's count of the tokens fed so far, over all ranks; the labelled ones where the trainer
            # counts them (common.training.LabelledSFTTrainer)
            counts = {"tokens_per_s": float(logs.get("num_input_tokens_seen", 0.0)),
                      "trained_tokens_per_s": float(logs.get("labelled_tokens", 0.0))}
            seconds = max(now - self.last_time, 1e-9)
            rates = {key: round((n - self.last_counts.get(key, 0.0)) / seconds, 1) if n else None
                     for key, n in counts.items()}
            self.last_counts, self.last_time = counts, now
            row.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"), **rates)
        if "eval_loss" in logs:
            row["eval_loss"] = logs["eval_loss"]
        row.update({k: v for k, v in logs.items() if k.removeprefix("eval_").startswith(self.METHOD_METRICS)})
        if len(row) == 2:  # end-of-training summary (train_runtime...): not a metrics row
            return
        row["elapsed_s"] = round(now - self.start, 1)
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.log(self.format(row, state.max_steps))

    @staticmethod
    def format(row: dict, max_steps: int) -> str:
        parts = [f"step {row['step']}/{max_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"), ("rewards/margins", "margin {:.3f}"),
                         ("rewards/accuracies", "reward acc {:.2f}"), ("reward", "reward {:.3f}"), ("lr", "lr {:.2e}"),
                         ("grad_norm", "grad_norm {:.3f}"), ("tokens_per_s", "{:.0f} tok/s"), ("elapsed_s", "{:.0f}s")):
            if row.get(key) is not None:
                parts.append(fmt.format(row[key]))
        return "  ".join(parts)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_metrics(self.run_dir)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_metrics(self.run_dir)


class EvalPromptsCallback(TrainerCallback):
    """Answers evaluation.prompts before training, every `every_n_steps`, at each save and at the end; writes
    eval_outputs/step_N.txt. Answers come from the generation core, as chat's do. Generation runs with the cache on
    and in eval mode, then every touched setting is put back, and the RNG is forked so sampling does not shift the
    training run (resume stays exact)."""

    def __init__(self, tokenizer, template, evaluation, system: str | None, run_dir: str | Path, log: RunLog,
                 on_answers=None):
        from common.generation import Sampling

        self.on_answers = on_answers  # (step, [(prompt, answer)]): the trackers (common.trackers)
        self.tokenizer, self.template, self.prompts, self.system = tokenizer, template, evaluation.prompts, system
        self.every, self.sampling = evaluation.every_n_steps, Sampling.from_evaluation(evaluation)
        self.out_dir, self.log = Path(run_dir) / EVAL_OUTPUTS_DIR, log
        self.done: set[int] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.generate(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every > 0 and state.global_step % self.every == 0:
            self.generate(model, state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        self.generate(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.generate(model, state.global_step)

    def generate(self, model, step: int) -> Path | None:
        out = self.out_dir / f"step_{step}.txt"
        # A resumed run starts at a step whose answers its checkpoint save already wrote.
        if not self.prompts or not is_main_process() or step in self.done or out.exists():
            return None
        self.done.add(step)
        answers = self.answer_all(model)
        text = "".join(f"### Prompt {i}\n{p}\n### Answer {i}\n{a}\n\n" for i, (p, a) in enumerate(answers, 1))
        write_text(out, text)
        self.log(f"evaluation prompts at step {step} -> {out}\n" + text.rstrip())
        if self.on_answers is not None:
            self.on_answers(step, answers)
        return out

    def answer_all(self, model) -> list[tuple[str, str]]:
        from common.generation import Generator

        was_training = model.training
        config = model.config
        cache = config.use_cache
        checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        generator = Generator(model, self.tokenizer, self.template)
        system = [{"role": "system", "content": self.system}] if self.system else []
        device = next(model.parameters()).device
        answers = []
        try:
            model.eval()
            config.use_cache = True
            for m in checkpointed:
                m.gradient_checkpointing = False
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for prompt in self.prompts:
                    messages = system + [{"role": "user", "content": prompt}]
                    answers.append((prompt, generator.generate(messages, self.sampling).text))
        finally:
            config.use_cache = cache
            for m in checkpointed:
                m.gradient_checkpointing = True
            model.train(was_training)
        return answers


class InterruptCallback(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, stop. A second Ctrl-C aborts at once.
    Under DDP the flag is agreed on by all ranks, so every rank stops at the same step and the save cannot hang."""

    def __init__(self, log: RunLog):
        self.log = log
        self.signal: int | None = None
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            # an ignored signal stays ignored: a shell starts background jobs with SIGINT ignored, so that Ctrl-C at
            # the terminal does not reach them (stop one with `kill PID`: SIGTERM saves a checkpoint too)
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal acts as usual
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort)", file=sys.stderr, flush=True)

    def _agreed(self) -> int:
        flag = self.signal or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([flag], dtype=torch.int64)
            if torch.distributed.get_backend() == "nccl":
                t = t.cuda()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        flag = self._agreed()
        if flag:
            self.signal = flag
            control.should_save = True
            control.should_training_stop = True
            self.log(f"interrupted by {signal.Signals(flag).name} at step {state.global_step}: saving checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def exit_code(self) -> int:
        return 128 + self.signal if self.signal else 0


class CheckpointCallback(TrainerCallback):
    """Completes each checkpoint the Trainer has written under the staging directory (training.run_arguments): adds
    the run's recipe.yaml, renames it into the run directory (so checkpoint-N/ appears whole or not at all), and keeps
    the newest `train.save_total_limit`. Every rank wrote its RNG state before `on_save`; the barrier waits for all."""

    def __init__(self, recipe):
        self.recipe = recipe
        self.run_dir = Path(recipe.train.output_dir)

    def on_save(self, args, state, control, **kwargs):
        from common.recipe import save_recipe

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if args.should_save:
            name = f"{artifacts.CHECKPOINT_PREFIX}{state.global_step}"
            written = Path(args.output_dir) / name
            save_recipe(self.recipe, written / artifacts.RECIPE_FILE)
            artifacts.replace_dir(written, self.run_dir / name)
            artifacts.rotate(self.run_dir, self.recipe.train.save_total_limit)


def run_callbacks(recipe, run_dir: Path, log: RunLog, interrupt: InterruptCallback, tokenizer, template,
                  tracker=None) -> list:
    """The callbacks of a training run: checkpoints completed in place, metrics + plot, Ctrl-C, evaluation prompts,
    TensorBoard in OUTPUT_DIR/runs/ (main process only, unless train.report_to leaves it out) and the run's setup
    and answers for the other trackers (common.trackers.TrackerCallback)."""
    from common import trackers

    callbacks = [CheckpointCallback(recipe), MetricsCallback(run_dir, log), interrupt,
                 EvalPromptsCallback(tokenizer, template, recipe.evaluation, recipe.evaluation.system or recipe.data.system,
                                     run_dir, log, tracker.answers if tracker is not None else None)]
    if tracker is not None:
        callbacks.append(tracker)
    if is_main_process() and "tensorboard" in trackers.names(recipe.train.report_to):
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir

        callbacks.append(TensorBoardCallback(SummaryWriter(str(run_dir / artifacts.TENSORBOARD_DIR / default_logdir()))))
    return callbacks
