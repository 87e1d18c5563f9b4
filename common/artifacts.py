"""What a folder is: the one place that knows the on-disk artifacts, their file names, how to tell them apart, and
how to read the run's recipe from any of them. Every script asks here.

  OUTPUT_DIR/                   a run directory (train.output_dir)
    recipe.yaml                 the run's resolved recipe
    train.log  metrics.jsonl  loss.png  runs/ (TensorBoard)
    eval_outputs/step_N.txt     evaluation-prompt answers during training
    checkpoint-N/               Trainer checkpoints (adapter or full model, tokenizer, recipe.yaml, optimizer/RNG state)
    final/                      PEFT adapter (or full model) + tokenizer with its chat template + recipe.yaml
    merged/                     merge.py's default output: a full HF model (+ model-<type>.gguf, Modelfile)
    eval/                       eval.py's report.md and report.json
    ratings.jsonl               preference pairs rated on the web page (chat.py --serve), one a line, appended
  work_dirs/latest -> OUTPUT_DIR (symlink to the newest run)

Outputs appear whole or not at all: written under a temporary name beside their destination, then renamed.
"""
from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common.cli import UserError, first_line, read_json, reading

WORK_DIRS = Path("work_dirs")
LATEST = "latest"
RECIPE_FILE = "recipe.yaml"
LOG_FILE, METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR = "train.log", "metrics.jsonl", "loss.png", "runs"
EVAL_OUTPUTS_DIR = "eval_outputs"
FINAL_DIR, MERGED_DIR, EVAL_DIR = "final", "merged", "eval"
EVAL_REPORT, RATINGS_FILE = "report.json", "ratings.jsonl"  # in EVAL_DIR; in the run directory
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's PREFIX_CHECKPOINT_DIR + "-"
STAGING_PREFIX = ".saving-"  # never matches `checkpoint-*`, so resume and rotation ignore half-written saves
TRAINER_STATE = "trainer_state.json"
CRC_CHECK_BYTES = 4 * 2**30  # resume checks checkpoint files up to this size against their checksums

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_CONFIG, GENERATION_CONFIG = "config.json", "generation_config.json"
# (shard index, files without one), safetensors first: never unpickle needlessly
MODEL_WEIGHTS = (("model.safetensors.index.json", "model*.safetensors"),
                 ("pytorch_model.bin.index.json", "pytorch_model*.bin"))
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
MODELFILE = "Modelfile"  # Ollama's, beside a GGUF export
MAX_LENGTH_CAP = 4096  # a model without a run: max_position_embeddings can be 128k, which CPU chat never needs


# ---------------------------------------------------------------- what a directory holds

def is_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def model_weight_files(path: Path) -> list[Path]:
    """A model directory's weight files, [] if none: the shards its index names (each checked to exist), else
    model.safetensors (or its shards); only then pytorch_model*.bin."""
    for index, pattern in MODEL_WEIGHTS:
        if (Path(path) / index).is_file():
            return index_shards(Path(path) / index)
        files = sorted(Path(path).glob(pattern))
        if files:
            return files
    return []


def is_full_model(path: Path) -> bool:
    """config.json + weights, and no adapter config (a full fine-tune, a merged model, a base model)."""
    path = Path(path)
    return not is_adapter(path) and (path / MODEL_CONFIG).is_file() and bool(model_weight_files(path))


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def adapter_weights(path: Path) -> Path | None:
    return next((Path(path) / name for name in ADAPTER_WEIGHTS if (Path(path) / name).is_file()), None)


def adapter_base(adapter_dir: Path) -> str:
    """`base_model_name_or_path` of an adapter directory."""
    base = read_json(Path(adapter_dir) / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: no `base_model_name_or_path`; name the base model explicitly")
    return base


def resolve_base(base: str) -> Path:
    """A local model directory, or a hub id fetched (or found in the cache) through huggingface_hub."""
    path = Path(base)
    if path.is_dir():
        return path
    if path.is_absolute() or base.startswith(".") or base.count("/") != 1:
        raise UserError(f"{base}: base model directory not found")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.jinja", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated: all mean the same thing to the user
        raise UserError(f"{base}: not a local directory and not downloadable from the hub ({type(e).__name__})") from None


# ---------------------------------------------------------------- runs and their recipe

def find_recipe_file(path: str | Path) -> Path | None:
    """recipe.yaml in the directory itself or in its run directory (for checkpoint-N/, final/, merged/)."""
    path = Path(path)
    for d in (path, path.parent):
        if (d / RECIPE_FILE).is_file():
            return d / RECIPE_FILE
    return None


def run_recipe(path: str | Path):
    """The recipe of the run that `path` (a run dir, checkpoint, final/ or merged/) belongs to, or None. Its model and
    data paths are relative to where training ran, so they are not checked here."""
    from common.recipe import load_recipe

    file = find_recipe_file(path)
    return load_recipe(file, for_training=False) if file else None


def model_settings(model: Path, adapter: Optional[Path] = None):
    """The settings a model is used with (chat, eval, the GGUF export): the recipe of the run its adapter, else the
    model itself, comes from; for a model without a run, the schema's defaults (common/recipe.py): the tokenizer's
    chat template, no system prompt, the `evaluation` section's sampling, no remote code, and as data.max_length the
    model's max_position_embeddings capped at MAX_LENGTH_CAP. Decided here, once: no caller asks "was there a run"."""
    from common.recipe import DataConfig, ModelConfig, Recipe

    recipe = (run_recipe(adapter) if adapter is not None else None) or run_recipe(model)
    if recipe is not None:
        return recipe
    config = model_config(model)
    if config is None:  # a remote-code architecture: config.json's own value
        length = read_json(model / MODEL_CONFIG).get("max_position_embeddings")
    else:
        length = getattr(config, "max_position_embeddings", None)
    length = min(length, MAX_LENGTH_CAP) if isinstance(length, int) and length > 0 else MAX_LENGTH_CAP
    return Recipe(model=ModelConfig(path=str(model)), data=DataConfig(max_length=length))


def set_latest(run_dir: str | Path, work_dirs: Path = WORK_DIRS) -> None:
    """Point work_dirs/latest at run_dir, atomically (a symlink renamed over the old one)."""
    with atomic_file(work_dirs / LATEST) as tmp:
        tmp.symlink_to(Path(run_dir).resolve(), target_is_directory=True)


def latest_run(work_dirs: Path = WORK_DIRS) -> Path:
    link = work_dirs / LATEST
    if link.is_symlink() and not link.exists():  # a run written to a temporary train.output_dir, since removed
        raise UserError(f"{link} points to {os.readlink(link)}, which is gone; train again or pass a path")
    if not link.exists():
        raise UserError(f"{link}: no run recorded yet; train first (python train.py RECIPE) or pass a path")
    return link.resolve()


def is_run_dir(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file() and not (path / MODEL_CONFIG).is_file() and not is_adapter(path)


def run_model(run: Path, adapter_first: bool = False) -> Path:
    """A run directory means its merged model, else its final adapter (or full model); adapter_first: the other way
    round (eval.py switches the adapter off to get the base)."""
    for name in (FINAL_DIR, MERGED_DIR) if adapter_first else (MERGED_DIR, FINAL_DIR):
        if (run / name / MODEL_CONFIG).is_file() or is_adapter(run / name):
            return run / name
    raise UserError(f"{run}: neither {MERGED_DIR}/ nor {FINAL_DIR}/ holds a model (has training finished?)")


@dataclass
class ModelSource:
    """What to load for generation: a full model, optionally an adapter on it, and the settings to use it with."""

    model: Path  # a full HF model directory
    recipe: object  # model_settings(): the run's Recipe, or the schema's defaults for a model without a run
    adapter: Optional[Path] = None  # a PEFT adapter loaded on top of `model`

    @property
    def tokenizer_dir(self) -> Path:
        # final/ holds the tokenizer saved with the chat template training used; the base may lack it
        return self.adapter if self.adapter is not None and has_tokenizer(self.adapter) else self.model

    @property
    def run_dir(self) -> Path | None:
        """The run directory the adapter (or model) is part of (final/, merged/, checkpoint-N/ of a run)."""
        path = Path(self.adapter or self.model)
        return next((d for d in (path, path.parent) if is_run_dir(d)), None)

    @property
    def name(self) -> str:
        return f"{self.model}" + (f" + {self.adapter}" if self.adapter else "")


def resolve_model(model: Optional[str], adapter: Optional[str] = None, adapter_first: bool = False) -> ModelSource:
    """MODEL [--adapter DIR] -> what to load. No MODEL: the latest run. A run directory means its merged model (else
    final/; adapter_first: final/ first); an adapter directory as MODEL is loaded on the base named in its
    adapter_config.json."""
    path = Path(model) if model else run_model(latest_run(), adapter_first)
    if model and not path.exists():
        raise UserError(f"{path}: no such model directory")
    if path.is_dir() and is_run_dir(path):
        path = run_model(path, adapter_first)
    adapter_dir = Path(adapter) if adapter else None
    if adapter_dir is not None and not is_adapter(adapter_dir):
        raise UserError(f"--adapter {adapter_dir}: no {ADAPTER_CONFIG} there (not a PEFT adapter directory)")
    if adapter_dir is None and is_adapter(path):
        adapter_dir, path = path, None
    if path is None:
        try:
            path = resolve_base(adapter_base(adapter_dir))
        except UserError as e:  # the base was named relative to where training ran
            raise UserError(f"{e} (named in {adapter_dir}/{ADAPTER_CONFIG}); pass the base: "
                            f"MODEL --adapter {adapter_dir}") from None
    elif not (path / MODEL_CONFIG).is_file():
        raise UserError(f"{path}: no {MODEL_CONFIG} (not a Hugging Face model directory)")
    return ModelSource(path, model_settings(path, adapter_dir), adapter_dir)


# ---------------------------------------------------------------- checkpoints

def checkpoint_step(path: Path) -> int:
    try:
        return int(Path(path).name.removeprefix(CHECKPOINT_PREFIX))
    except ValueError:
        return -1


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*"), key=checkpoint_step)


def staging_dir(run_dir: str | Path) -> Path:
    """Where the Trainer writes checkpoint-N/ before it is renamed into the run directory, complete."""
    return Path(run_dir) / f"{STAGING_PREFIX}checkpoints"


def rotate(run_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` checkpoints. Called after a save is complete, so the one a run resumed from needs no
    protection: it goes once `limit` newer complete ones exist, like any other."""
    if limit and limit > 0:
        for path in checkpoints(run_dir)[:-limit]:
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume(run_dir: str | Path, resume: str | None) -> str | None:
    """--resume auto: the newest complete checkpoint of the run (None: nothing to resume, start fresh);
    --resume PATH: that checkpoint, or the newest one inside a run directory."""
    if resume is None:
        return None
    path = Path(run_dir) if resume == "auto" else Path(resume)
    if (path / TRAINER_STATE).is_file():
        found = [path]
    else:
        found = [c for c in checkpoints(path) if (c / TRAINER_STATE).is_file()] if path.is_dir() else []
    if not found and resume != "auto":
        raise UserError(f"--resume {resume}: not a checkpoint directory (no {TRAINER_STATE}) nor a run holding {CHECKPOINT_PREFIX}N/")
    if not found:
        return None
    check_checkpoint(found[-1])
    return str(found[-1])


def check_safetensors(file: Path) -> None:
    """Read a safetensors file's header (cheap: the tensors stay on disk)."""
    from safetensors import safe_open

    with reading(file, "not a readable safetensors file"), safe_open(file, framework="pt") as f:
        list(f.keys())


def index_shards(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, in order; each checked to exist."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise UserError(f"{index}: expected `weight_map`, an object of tensor name -> shard file name")
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{index}: names shard(s) that are not in {index.parent}: {', '.join(missing[:3])}")
    return files


def model_config(path: Path):
    """The config of a local model whose architecture transformers has built in, parsed by it (types and values
    checked: a damaged config.json is a UserError naming it); None for a remote-code or unknown architecture."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = read_json(path / MODEL_CONFIG).get("model_type")
    if not (isinstance(model_type, str) and model_type in CONFIG_MAPPING):
        return None
    with reading(path / MODEL_CONFIG, f"not a valid `{model_type}` model config"):
        return AutoConfig.from_pretrained(path)


# Read before transformers reads them, so that a damaged file is named in the error: transformers' own message often
# does not say which shard or file failed. Local directories only; a hub id is fetched and reported by transformers.

def check_tokenizer_files(path: str | Path) -> None:
    """tokenizer_config.json, tokenizer.json, and config.json (AutoTokenizer reads it too)."""
    path = Path(path)
    if not path.is_dir():
        return
    if (path / MODEL_CONFIG).exists():
        model_config(path)
    if (path / TOKENIZER_FILES[0]).exists():
        read_json(path / TOKENIZER_FILES[0])
    if (path / TOKENIZER_FILES[1]).exists():
        from tokenizers import Tokenizer

        with reading(path / TOKENIZER_FILES[1], "not a valid tokenizer file"):
            Tokenizer.from_file(str(path / TOKENIZER_FILES[1]))


def check_model_files(path: str | Path) -> None:
    """config.json, generation_config.json, the shard index and the safetensors headers (the tensors stay on disk)."""
    path = Path(path)
    if not path.is_dir():
        return
    if (path / MODEL_CONFIG).exists():
        model_config(path)
    if (path / GENERATION_CONFIG).exists():
        read_json(path / GENERATION_CONFIG)
    for file in model_weight_files(path):  # the shard index too
        if file.suffix == ".safetensors":
            check_safetensors(file)


def check_checkpoint(path: Path) -> None:
    """Open every file a resume reads before training starts, so a damaged checkpoint is one line rather than a
    traceback from inside the Trainer. Torch's zip files are checked against their CRCs (for LoRA they hold a few
    times the adapter's size), safetensors files by their headers."""
    import zipfile

    for file in sorted(Path(path).iterdir()):
        if file.suffix == ".json":
            read_json(file)
        elif file.suffix == ".safetensors":
            check_safetensors(file)
        elif file.suffix in (".pt", ".pth", ".bin"):
            with reading(file, "not a readable checkpoint file"), zipfile.ZipFile(file) as z:
                # CRCs read the whole file: for a full fine-tune's optimizer state, the zip's directory is enough
                damaged = z.testzip() if file.stat().st_size <= CRC_CHECK_BYTES else None
            if damaged:
                raise UserError(f"{file}: damaged (checksum mismatch in {damaged})")


def prepare_run_dir(run_dir: str | Path, resuming: bool, force: bool) -> Path:
    """Refuse to train over an earlier run unless resuming it or told to (--force starts the run over)."""
    run_dir = Path(run_dir)
    earlier = [p.name for p in checkpoints(run_dir)] + ([FINAL_DIR] if (run_dir / FINAL_DIR).exists() else [])
    if earlier and not resuming:
        if not force:
            raise UserError(f"{run_dir} already holds a run ({', '.join(earlier[:3])}); "
                            "--resume auto continues it, --force starts over, or set train.output_dir")
        shutil.rmtree(run_dir)
    for stale in run_dir.glob(f"{STAGING_PREFIX}*"):  # a save killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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
def atomic_dir(dst: Path, replace: bool = True):
    """Yield a temp dir next to dst (same filesystem); when the block completes it becomes dst, and when the block
    raises (SystemExit and Ctrl-C included) it is removed and dst is untouched. replace=False: a dst that exists by
    then (another process made the same output first) is kept, and ours dropped."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dst.parent, f".{dst.name}.tmp-", "")
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _as_user_error(e, dst)
        raise
    if replace:
        replace_dir(tmp, dst)
        return
    try:
        os.rename(tmp, dst)  # fails on a non-empty dst, which is then the other process's
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(dst: Path):
    """Yield a temp path beside dst, with dst's suffix (writers that pick the format by it, like savefig, still
    can); when the block completes it is renamed over dst, and when the block raises it is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dst.parent, f".{dst.stem}.tmp-", dst.suffix)
    tmp = dst.with_name(f".{dst.stem}.tmp-{os.getpid()}{dst.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _as_user_error(e, dst)
        raise
    os.replace(tmp, dst)


def remove_leftovers(folder: Path, prefix: str, suffix: str) -> None:
    """Remove the temporary outputs `{prefix}PID{suffix}` in folder whose process is gone: what a writer killed
    outright (SIGKILL, the OOM killer, a power cut) leaves behind, never renamed into place; say so on stderr. A
    live process's is its work in progress and stays."""
    for path in folder.glob(f"{prefix}*{suffix}"):
        pid = path.name[len(prefix):len(path.name) - len(suffix)]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            print(f"note: removed {path}, left by an earlier process ({pid}) that ended before it finished writing",
                  file=sys.stderr)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def write_failure(e: BaseException) -> Optional[str]:
    """Why a write failed, when `e` is the machine's state rather than a bug (a full disk, a file-size or quota
    limit, a read-only or vanished folder), else None."""
    from safetensors import SafetensorError

    if isinstance(e, OSError):
        why = first_line(e)
        if e.errno is None:  # numpy's tofile reports a short write without one: "N requested and M written"
            why += ": a full disk, or a file-size or quota limit"
        return why
    if isinstance(e, SafetensorError) and "I/O error" in str(e):  # its own type around the OS's error (shards)
        return first_line(e)
    if isinstance(e, RuntimeError) and "inline_container.cc" in str(e):  # torch.save's writer says only "unexpected pos"
        return f"torch.save stopped mid-file ({first_line(e)}): a full disk, or a file-size or quota limit"
    return None


def _as_user_error(e: BaseException, dst: Path) -> None:
    """An OS error while an output was being written is one line naming the output, which was not written, and
    exit 2."""
    why = write_failure(e)
    if why is not None:
        raise UserError(f"{dst}: not written ({why}); nothing of it was left behind") from e


@contextmanager
def writing_run(run_dir: Path):
    """Training and its final save, which the Trainer writes under STAGING_PREFIX names (checkpoint-N/ in
    staging_dir, final/ beside it): a save that fails for want of room (see write_failure) ends the run with one
    line naming what was being saved, its half-written files removed; the complete checkpoints before it stay, to
    resume from."""
    try:
        yield
    except BaseException as e:
        why = write_failure(e)
        if why is None:  # Ctrl-C, a bug: not ours to describe
            raise
        run_dir, staged = Path(run_dir), staging_dir(run_dir)
        half = [*staged.glob(f"{CHECKPOINT_PREFIX}*"), *(p for p in run_dir.glob(f"{STAGING_PREFIX}*") if p != staged)]
        if not half:
            raise
        newest = max(half, key=lambda p: p.stat().st_mtime)
        for stale in run_dir.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        raise UserError(f"{run_dir / newest.name.removeprefix(STAGING_PREFIX)}: not written ({why}); nothing of it "
                        f"was left behind; make room, then continue with --resume auto") from e


def write_text(path: Path, text: str) -> None:
    """A text file that appears whole."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
