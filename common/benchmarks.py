"""Did the model forget what it knew? lm-evaluation-harness tasks, base vs tuned (`eval.py --tasks`).

lm-eval is optional (`pip install lm-eval==LM_EVAL_VERSION`; the Makefile's test tools pin it): `tasks()` checks the
names before any model loads, `run()` scores both contestants of common.evaluation with the models already loaded
(lm-eval's HFLM is handed our model: the adapter switched off for the base, never merged). A task is a name lm-eval
knows (its datasets come from the hub) or a YAML task file of the user's; relative `data_files` in such a file are
read relative to the file, so a task over local JSON runs anywhere, without a hub.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError, did_you_mean, first_line, reading

LM_EVAL_VERSION = "0.4.13"  # the version the tests run; the Makefile's test tools line pins the same
INSTALL = f"pip install lm-eval=={LM_EVAL_VERSION}"


@dataclass
class Tasks:
    """What --tasks named, checked: lm-eval's names, and task configurations read from the user's YAML files."""

    named: list[str]
    files: dict[str, dict]  # task name -> its configuration (data_files resolved)
    manager: object  # lm-eval's TaskManager: its index of built-in tasks only where a name needs it (a minute to build)

    @property
    def labels(self) -> list[str]:
        return self.named + list(self.files)


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def tasks(names: list[str]) -> Tasks:
    """--tasks checked before anything loads: lm-eval installed, each YAML file readable as a task, each name one
    lm-eval knows (with the nearest name when not)."""
    if not lm_eval_available():
        raise UserError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL}")
    quiet_lm_eval()
    named, files = [], {}
    for name in names:
        path = Path(name)
        if path.suffix in (".yaml", ".yml") or path.exists():
            config = task_file(path)
            files[config["task"]] = config
        else:
            named.append(name)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=bool(named))
    unknown = [n for n in named if n not in manager.all_tasks]
    if unknown:
        raise UserError("; ".join(f"--tasks: lm-eval has no task `{n}`{did_you_mean(n, manager.all_tasks)}"
                                  for n in unknown) + " (a task of your own: name its YAML file)")
    return Tasks(named, files, manager)


def task_file(path: Path) -> dict:
    """A YAML task file as lm-eval reads it (its `!function` tags resolved next to it), with relative data_files
    made relative to the file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise UserError(f"{path}: {'is a directory, expected' if path.is_dir() else 'no such'} task file (a YAML file)")
    with reading(path, "not a readable lm-eval task file"):
        config = load_yaml(path)
    if not isinstance(config.get("task"), str):
        raise UserError(f"{path}: an lm-eval task file needs a `task:` name (a group or `include`-only file is not "
                        "supported here)")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        config["dataset_kwargs"]["data_files"] = _relative_to(files, path.parent)
    return config


def _relative_to(files, folder: Path):
    """data_files (a path, a list, or split -> path(s)) with relative local paths taken from `folder`."""
    if isinstance(files, dict):
        return {split: _relative_to(f, folder) for split, f in files.items()}
    if isinstance(files, list):
        return [_relative_to(f, folder) for f in files]
    if isinstance(files, str) and "://" not in files and not Path(files).is_absolute() and (folder / files).exists():
        return str((folder / files).resolve())
    return files


def quiet_lm_eval() -> None:
    """lm-eval logs every step at INFO, and warns that it was handed a model rather than a name (which is the point)."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def run(models, chosen: Tasks, limit: int | None = None, batch_size: int = 8, progress: bool = False) -> dict:
    """Each task's metrics for `base` and `tuned` (common.evaluation.Contestants), side by side:
    {"tasks": {task: {metric: {"base", "tuned", "base_stderr", "tuned_stderr"}}}, "samples": {task: n}, ...}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    scores, samples = {}, {}
    for who in ("base", "tuned"):
        with models.use(who) as model:
            lm = HFLM(pretrained=model, tokenizer=models.tokenizer, batch_size=batch_size)
            try:
                out = simple_evaluate(model=lm, tasks=chosen.named + list(chosen.files.values()), limit=limit,
                                      task_manager=chosen.manager, log_samples=False, bootstrap_iters=1000)
            except (OSError, ConnectionError, ValueError) as e:  # a hub dataset that cannot be fetched, a bad task
                raise UserError(f"--tasks: lm-eval could not run {', '.join(chosen.labels)} ({first_line(e)})") from None
        for task, metrics in out["results"].items():
            samples[task] = out.get("n-samples", {}).get(task, {}).get("effective")
            for key, value in metrics.items():
                name = key.partition(",")[0]  # "acc,none": the metric, then lm-eval's filter
                metric = name.removesuffix("_stderr")
                if metric not in out["higher_is_better"].get(task, {}):  # alias, sample_len...
                    continue
                number = isinstance(value, (int, float)) and value == value  # a stderr may be "N/A" or NaN
                scores.setdefault(task, {}).setdefault(metric, {})[
                    f"{who}_stderr" if name != metric else who] = value if number else None
    return {"tasks": scores, "samples": samples, "limit": limit, "lm_eval": _version()}


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def markdown(benchmarks: dict) -> list[str]:
    """The task scores side by side, with lm-eval's standard errors."""
    lines = ["", f"## Benchmarks (lm-evaluation-harness {benchmarks['lm_eval']})", "",
             "| task | metric | examples | base | tuned | change |", "|---|---|---|---|---|---|"]
    for task, metrics in benchmarks["tasks"].items():
        for metric, v in metrics.items():
            b, t = v.get("base"), v.get("tuned")
            lines.append(f"| {task} | {metric} | {benchmarks['samples'].get(task) or ''} | {_cell(b, v.get('base_stderr'))} "
                         f"| {_cell(t, v.get('tuned_stderr'))} | {'' if b is None or t is None else f'{t - b:+.4f}'} |")
    return lines


def _cell(value, stderr) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def summary(benchmarks: dict) -> str:
    return "benchmarks: " + "; ".join(
        f"{task} {metric} base {v.get('base', float('nan')):.4f} -> tuned {v.get('tuned', float('nan')):.4f}"
        for task, metrics in benchmarks["tasks"].items() for metric, v in metrics.items())
