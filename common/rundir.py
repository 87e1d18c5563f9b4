"""The run directory layout: the one place that knows its file names.

OUTPUT_DIR/
  recipe.yaml            resolved recipe of the run
  train.log  metrics.jsonl  loss.png  runs/ (TensorBoard)
  eval_outputs/step_N.txt
  checkpoint-N/          Trainer checkpoints (adapter or full model, tokenizer, recipe.yaml, optimizer/RNG state)
  final/                 PEFT adapter (or full model) + tokenizer with chat template + recipe.yaml
  merged/                merge.py's default output
work_dirs/latest -> OUTPUT_DIR   (symlink to the newest run)
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from common.cli import UserError

RECIPE_FILE = "recipe.yaml"
FINAL_DIR = "final"
MERGED_DIR = "merged"
EVAL_DIR = "eval_outputs"
WORK_DIRS = Path("work_dirs")


def set_latest(run_dir: str | Path, work_dirs: Path = WORK_DIRS) -> None:
    """Point work_dirs/latest at run_dir, atomically (a symlink renamed over the old one)."""
    work_dirs.mkdir(parents=True, exist_ok=True)
    link, tmp = work_dirs / "latest", work_dirs / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(Path(run_dir).resolve(), target_is_directory=True)
    os.replace(tmp, link)


def latest_run(work_dirs: Path = WORK_DIRS) -> Path:
    link = work_dirs / "latest"
    if not link.exists():
        raise UserError(f"{link}: no run recorded yet; train first (python train.py RECIPE) or pass a path")
    return link.resolve()


def find_recipe_file(path: str | Path) -> Path | None:
    """recipe.yaml in the directory itself or in its run directory (for checkpoint-N/ and final/)."""
    path = Path(path)
    for d in (path, path.parent):
        if (d / RECIPE_FILE).is_file():
            return d / RECIPE_FILE
    return None


# ---------------------------------------------------------------- outputs appear whole or not at all

def check_output(dst: Path, sources: list[Path], force: bool) -> None:
    """Refuse before any work: an existing output without --force, or one that would replace an input."""
    d = Path(dst).resolve()
    for src in sources:
        s = Path(src).resolve()
        if d == s or d in s.parents:
            raise UserError(f"{dst}: the output would replace the input {src}; choose another output")
    if (Path(dst).exists() or Path(dst).is_symlink()) and not force:
        raise UserError(f"{dst}: already exists; pass --force to replace it, or choose another output")


def replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst. An existing dst is moved aside first and removed last (rename cannot replace a
    directory), so an interruption never leaves neither."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextmanager
def atomic_dir(dst: Path):
    """Yield a temp dir next to dst (same filesystem); when the block completes it becomes dst, and when the block
    raises (SystemExit and Ctrl-C included) it is removed and dst is untouched."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dst)
