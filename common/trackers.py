"""Experiment trackers (train.report_to): TensorBoard in the run directory (ours, always there unless `none`), and
W&B, MLflow, SwanLab and Trackio through transformers' own integrations (TrainingArguments.report_to). None is a
requirement: a tracker whose package is missing is one recipe problem naming the pip install.

What goes with a run beside the Trainer's metrics and arguments: the recipe, the precision choice and the dataset
statistics, once at the start; the evaluation prompts' answers only with train.report_answers (counselling text is
sensitive: a tracker is often a hosted service, so they stay in the run directory unless the recipe says so).
To add a tracker: its transformers integration name, package and two small functions in TRACKERS.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from typing import Callable, Optional

from transformers import TrainerCallback


def _flat(prefix: str, value) -> dict:
    """A nested mapping as flat `a/b/c` keys with short string values (trackers' parameters are flat)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}/{key}" if prefix else str(key), item))
        return out
    return {prefix: json.dumps(value, ensure_ascii=False)[:500] if not isinstance(value, (int, float, str)) else value}


def _answers_text(step: int, answers: list[tuple[str, str]]) -> str:
    return "".join(f"### Prompt {i}\n{p}\n### Answer {i}\n{a}\n\n" for i, (p, a) in enumerate(answers, 1))


def _wandb_info(wandb, info: dict) -> None:
    if wandb.run is not None:
        wandb.config.update(info, allow_val_change=True)


def _wandb_answers(wandb, step: int, answers) -> None:
    if wandb.run is not None:
        table = wandb.Table(columns=["step", "prompt", "answer"], data=[[step, p, a] for p, a in answers])
        wandb.log({"evaluation/answers": table})


class _MlflowRun:
    """The run transformers' MLflowCallback started: it ends it at on_train_end, before the final answers are in."""
    run_id: Optional[str] = None


def _mlflow_info(mlflow, info: dict) -> None:
    run = mlflow.active_run()
    if run is None:
        return
    _MlflowRun.run_id = run.info.run_id
    mlflow.log_params(_flat("recipe", info["recipe"]) | _flat("precision", info["precision"]))
    mlflow.log_dict(info["recipe"], "recipe.json")
    mlflow.log_dict(info["dataset"], "dataset_stats.json")
    mlflow.log_metrics({f"dataset/{k}": v for k, v in info["dataset"].items() if isinstance(v, (int, float))})


def _mlflow_answers(mlflow, step: int, answers) -> None:
    if mlflow.active_run() is not None:
        mlflow.log_text(_answers_text(step, answers), f"evaluation_answers/step_{step}.txt")
    elif _MlflowRun.run_id is not None:
        with mlflow.start_run(run_id=_MlflowRun.run_id):
            mlflow.log_text(_answers_text(step, answers), f"evaluation_answers/step_{step}.txt")


def _swanlab_info(swanlab, info: dict) -> None:
    swanlab.config.update(info)


def _swanlab_answers(swanlab, step: int, answers) -> None:
    swanlab.log({"evaluation/answers": swanlab.Text(_answers_text(step, answers))}, step=step)


def _trackio_info(trackio, info: dict) -> None:
    trackio.log({f"setup/{k}": v for k, v in _flat("", info).items() if isinstance(v, (int, float))})


def _trackio_answers(trackio, step: int, answers) -> None:
    trackio.log({"evaluation/answers": _answers_text(step, answers)})


@dataclass(frozen=True)
class Tracker:
    package: str  # the module to import
    pip: str  # what to install
    log_info: Optional[Callable] = None  # (module, info) after the integration started its run
    log_answers: Optional[Callable] = None  # (module, step, [(prompt, answer)])


TRACKERS = {
    "tensorboard": Tracker("tensorboard", "tensorboard"),  # common.callbacks writes it into OUTPUT_DIR/runs
    "wandb": Tracker("wandb", "wandb", _wandb_info, _wandb_answers),
    "mlflow": Tracker("mlflow", "mlflow-skinny", _mlflow_info, _mlflow_answers),
    "swanlab": Tracker("swanlab", "swanlab", _swanlab_info, _swanlab_answers),
    "trackio": Tracker("trackio", "trackio", _trackio_info, _trackio_answers),
}
CHOICES = (*TRACKERS, "none")


def names(report_to) -> list[str]:
    chosen = [report_to] if isinstance(report_to, str) else list(report_to)
    return [] if chosen == ["none"] else chosen


def problems(report_to) -> list[str]:
    """Unknown tracker names and trackers whose package is not installed, one line each."""
    from common.cli import did_you_mean

    out = []
    for name in names(report_to):
        if name not in TRACKERS:
            out.append(f"`train.report_to`: unknown tracker `{name}`{did_you_mean(name, CHOICES)} "
                       f"(one of: {', '.join(CHOICES)})")
        elif importlib.util.find_spec(TRACKERS[name].package) is None:
            out.append(f"`train.report_to`: {name} needs its package (pip install {TRACKERS[name].pip})")
    return out


def integrations(report_to) -> list[str]:
    """TrainingArguments.report_to: the trackers transformers runs (TensorBoard is ours, in the run directory)."""
    return [name for name in names(report_to) if name != "tensorboard"] or ["none"]


class TrackerCallback(TrainerCallback):
    """Logs the run's setup (recipe, precision, dataset statistics) to the trackers transformers started, once they
    have started (their callbacks come first), and the evaluation answers when the recipe allows it."""

    def __init__(self, report_to, info: dict, answers: bool):
        self.trackers = [TRACKERS[n] for n in integrations(report_to) if n in TRACKERS]
        self.info, self.report_answers = info, answers

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            for tracker in self.trackers:
                if tracker.log_info:
                    tracker.log_info(importlib.import_module(tracker.package), self.info)

    def answers(self, step: int, answers: list[tuple[str, str]]) -> None:
        """Called by the evaluation prompts' callback with each step's answers."""
        if not self.report_answers:
            return
        for tracker in self.trackers:
            if tracker.log_answers:
                tracker.log_answers(importlib.import_module(tracker.package), step, answers)
