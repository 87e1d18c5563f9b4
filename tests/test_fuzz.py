"""Damaged and foreign files, fed to every reader: each case ends in exit 0 with a correct result, or exit 2 with one
`error:` line. Never a traceback, never a hang, never a half-written output.

Seeded and bounded: each script runs in-process on a tiny model (2 layers, hidden 64), one damaged file per case:
truncations at several offsets, byte flips (in the header and anywhere), random bytes, an empty file, a text file,
wrong-typed or missing JSON/YAML fields, the file missing, a directory where the file should be.
"""
from __future__ import annotations

import importlib
import json
import random
import shutil
import signal
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SEED = 16
CASE_SECONDS = 60  # a case still running after this is a hang
TEXT = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
WRONG_VALUES = ["sixteen", None, [], {}, -1, True, 1.5, "../../etc/passwd"]


# --- the files: one pristine tree, copied for every case --------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fuzz_pristine")
    shutil.copytree(tiny_model_dir, root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    model.save_pretrained(root / "sharded", max_shard_size="400KB")  # model.safetensors.index.json + 2 shards
    for f in (root / "base").iterdir():
        if not (root / "sharded" / f.name).exists() and f.name != "model.safetensors":
            shutil.copy2(f, root / "sharded" / f.name)
    assert all((root / "sharded" / f).is_file() for f in SHARDED_FILES)

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(root / "adapter")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "base"  # relative: each case runs in its own copy of the tree
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (root / "adapter" / "README.md").unlink(missing_ok=True)

    lora = OrderedDict((f"llm.{k}", v.detach().clone()) for k, v in peft_model.state_dict().items() if "lora_" in k)
    torch.save({"meta": {"cfg": "lora = dict(r=4, lora_alpha=8)\n"}, "state_dict": lora}, root / "iter_1.pth")
    torch.save(dict(lora), root / "lora.pt", _use_new_zipfile_serialization=False)  # the legacy (non-zip) format
    (root / "ds").mkdir()
    torch.save({"module": dict(lora), "buffer_names": []}, root / "ds" / "mp_rank_00_model_states.pt")

    records = json.loads((ROOT / "data" / "psych_sample.json").read_text(encoding="utf-8"))[:4]
    (root / "data.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"path": "base"}, "data": {"path": "data.json", "template": "qwen_chat", "max_length": 128},
        "train": {"output_dir": "work_dirs/fuzz"}}), encoding="utf-8")
    return root


# --- the readers ----------------------------------------------------------------------------------------------

def wrote_weights(out: str):
    """The run wrote a model or adapter directory whose safetensors headers read."""
    def check(case: Path, stdout: str) -> bool:
        from safetensors import safe_open

        weights = sorted((case / out).glob("*.safetensors"))
        for w in weights:
            with safe_open(w, framework="pt") as f:
                list(f.keys())
        return bool(weights) and any((case / out / c).is_file() for c in ("adapter_config.json", "config.json"))
    return check


def wrote_gguf(out: str):
    def check(case: Path, stdout: str) -> bool:
        from gguf import GGUFReader

        return len(GGUFReader(case / out).tensors) > 0
    return check


def wrote_report(out: str):
    return lambda case, stdout: (case / out / "report.json").is_file()


def printed(text: str = ""):
    return lambda case, stdout: stdout.strip() != "" and text in stdout


@dataclass
class Target:
    """A script run on the tree, the files it reads, and what a successful run leaves behind."""
    name: str
    argv: list[str]
    files: list[str]
    succeeded: Callable[[Path, str], bool]  # (the case's tree, stdout) -> the result is there and reads


MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
SHARDED_FILES = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "tokenizer.json", "tokenizer_config.json"]
ADAPTER_FILES = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]

TARGETS = [
    Target("convert", ["convert", "iter_1.pth", "out", "--base", "base"], ["iter_1.pth"], wrote_weights("out")),
    Target("convert", ["convert", "lora.pt", "out", "--base", "base", "--alpha", "8"], ["lora.pt"],
           wrote_weights("out")),
    Target("convert", ["convert", "ds", "out", "--base", "base", "--alpha", "8"], ["ds/mp_rank_00_model_states.pt"],
           wrote_weights("out")),
    Target("convert", ["convert", "adapter", "out", "--base", "base"], ADAPTER_FILES, wrote_weights("out")),
    Target("merge", ["merge", "sharded", "adapter", "out"], ADAPTER_FILES + [f"sharded/{f}" for f in SHARDED_FILES],
           wrote_weights("out")),
    Target("chat", ["chat", "sharded", "--once", "hi", "--max-new-tokens", "2", "--temperature", "0",
                    "--prompt-template", "qwen_chat"], [f"sharded/{f}" for f in SHARDED_FILES], printed()),
    Target("eval", ["eval", "adapter", "--data", "data.json", "--limit", "1", "--max-new-tokens", "2", "--out", "report"],
           ["data.json", "adapter/adapter_config.json", "base/config.json", "base/model.safetensors"],
           wrote_report("report")),
    Target("gguf", ["merge", "base", "--gguf", "f32"], [f"base/{f}" for f in MODEL_FILES],
           wrote_gguf("base/model-f32.gguf")),
    Target("train", ["train", "recipe.yaml", "--dry-run"], ["recipe.yaml", "data.json", "base/tokenizer.json"],
           printed("records")),
]


# --- the damage -----------------------------------------------------------------------------------------------

def mutations(rel: str, size: int, rng: random.Random) -> list:
    """The damage for one file: replacement bytes, "missing", "directory", or (kind, argument)."""
    out = [b"", TEXT, rng.randbytes(3000), "missing", "directory"]
    # truncated: twice in the first tenth (headers, the zip directory's start), three times anywhere
    pickle = rel.endswith((".pth", ".pt"))  # the unpickler has the most ways to fail, and each case is quick
    cuts = {rng.randrange(1, max(size // 10, 2)) for _ in range(2)} | {
        rng.randrange(1, max(size, 2)) for _ in range(10 if pickle else 3)}
    out += [("truncate", at) for at in sorted(cuts)]
    # flipped: twice in the header, once (pickles: eight times) anywhere
    for where in (min(size, 128), min(size, 128)) + (size,) * (8 if pickle else 1):
        out.append(("flip", sorted(rng.randrange(max(where, 1)) for _ in range(rng.randint(1, 4)))))
    if rel.endswith((".json", ".yaml")):
        out += [("field", None)] * 3  # a field of the file's own, drawn when applied
    return out


def leaves(obj, path=(), depth=3):
    """Key paths into nested dicts and lists, `depth` levels deep."""
    if depth == 0:
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield path + (k,)
        yield from leaves(v, path + (k,), depth - 1)


def damage(file: Path, what, rng: random.Random) -> str:
    """Apply one mutation; returns a description for the failure message."""
    if callable(what):
        return what(file)
    if what == "missing":
        file.unlink()
        return "missing"
    if what == "directory":
        file.unlink()
        file.mkdir()
        (file / "x").write_text("x")
        return "a directory"
    data = file.read_bytes()
    if isinstance(what, bytes):
        file.write_bytes(what)
        return f"{len(what)} replacement bytes"
    kind, arg = what
    if kind == "truncate":
        file.write_bytes(data[:arg])
        return f"truncated at {arg}"
    if kind == "flip":
        b = bytearray(data)
        for at in arg:
            b[at] ^= rng.randrange(1, 256)
        file.write_bytes(bytes(b))
        return f"flipped at {arg}"
    # a wrong-typed or missing field
    load, dump = ((json.loads, lambda o: json.dumps(o)) if file.suffix == ".json"
                  else (yaml.safe_load, lambda o: yaml.safe_dump(o)))
    obj = load(data.decode("utf-8"))
    path = rng.choice(list(leaves(obj)))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if rng.random() < 0.25:
        del parent[path[-1]]
        desc = f"field {'.'.join(map(str, path))} removed"
    else:
        parent[path[-1]] = rng.choice(WRONG_VALUES)
        desc = f"field {'.'.join(map(str, path))} = {parent[path[-1]]!r}"
    file.write_text(dump(obj), encoding="utf-8")
    return desc


# --- running ----------------------------------------------------------------------------------------------------

class Hang(Exception):
    pass


def run_script(argv: list[str]) -> int:
    module = importlib.import_module(argv[0])

    def alarm(*_):
        raise Hang(f"{argv} still running after {CASE_SECONDS}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_SECONDS)
    try:
        code = module.main(argv[1:])
    except SystemExit as e:
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code or 0


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def names(error: str, rel: str) -> bool:
    """Does the error line point at the damaged file: by name, or by its directory (a file gone missing; a value only
    the library's loader rejects, e.g. a special token of the wrong type: 12 of the 514 cases)?"""
    path = Path(rel)
    return path.name in error or (str(path.parent) != "." and f"{path.parent}" in error)


def run_case(pristine: Path, tmp: Path, target: Target, rel: str | None, what, seed: int, capsys,
             monkeypatch, expect_error: bool = False) -> str | None:
    """Copy the tree, damage one file, run the script: None if it behaved, else what went wrong."""
    case = tmp / "case"
    if case.exists():
        shutil.rmtree(case)
    shutil.copytree(pristine, case)
    desc = "undamaged" if rel is None else f"{rel}: " + damage(case / rel, what, random.Random(seed))
    before = tree(case)
    monkeypatch.chdir(case)
    capsys.readouterr()
    try:
        code = run_script(target.argv)
    except Hang as e:
        return f"{desc}: HANG: {e}"
    except BaseException as e:  # what a user would see as a traceback (PanicException is a BaseException)
        return f"{desc}: traceback: {type(e).__name__}: {str(e).strip()[:200]}"
    finally:
        monkeypatch.undo()
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    created = tree(case) - before
    if code == 2:
        if len(errors) != 1 or "Traceback" in out.err:
            return f"{desc}: exit 2 with {len(errors)} error lines: {out.err.strip()[:300]}"
        if created:
            return f"{desc}: exit 2 but left {sorted(created)[:5]} behind"
        if expect_error and len(out.err.strip().splitlines()) != 1:
            return f"{desc}: exit 2, but stderr is not one line: {out.err.strip()[:300]}"
        if rel is not None and not names(errors[0], rel):
            return f"{desc}: exit 2, but the error does not name {rel}: {errors[0][:300]}"
        return None
    if expect_error:
        return f"{desc}: exit {code}, expected exit 2 and one error line"
    if code != 0:
        return f"{desc}: exit {code}: {out.err.strip()[-300:]}"
    if errors:
        return f"{desc}: exit 0 but printed {errors[0]}"
    try:
        ok = target.succeeded(case, out.out)
    except Exception as e:
        return f"{desc}: exit 0 but the result does not read: {type(e).__name__}: {e}"
    return None if ok else f"{desc}: exit 0 but no result"


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t.name}:{t.argv[1]}")
def test_damaged_files_give_one_line_and_exit_2(target, pristine, tmp_path, capsys, monkeypatch):
    rng = random.Random(f"{SEED}:{target.argv}")
    failures = []
    problem = run_case(pristine, tmp_path, target, None, None, 0, capsys, monkeypatch)
    assert problem is None, f"the undamaged tree must work: {problem}"
    for rel in target.files:
        size = (pristine / rel).stat().st_size
        for what in mutations(rel, size, random.Random(f"{SEED}:{rel}")):
            problem = run_case(pristine, tmp_path, target, rel, what, rng.randrange(2**31), capsys, monkeypatch)
            if problem:
                failures.append(problem)
    assert not failures, f"{len(failures)} damaged files mishandled by {' '.join(target.argv)}:\n" + "\n".join(failures)


def json_edit(**changes):
    """A mutation: set (or, with None, remove) top-level fields of a JSON file."""
    def edit(file: Path) -> str:
        obj = json.loads(file.read_text(encoding="utf-8"))
        for key, value in changes.items():
            if value is None:
                obj.pop(key, None)
            else:
                obj[key] = value
        file.write_text(json.dumps(obj), encoding="utf-8")
        return f"fields {changes}"
    return edit


CONVERT_PTH = TARGETS[0]
MERGE = Target("merge", ["merge", "base", "adapter", "out"], [], wrote_weights("out"))
REPORTED = [  # the six cases issue 16 reported, each a traceback before
    (CONVERT_PTH, "iter_1.pth", b"Meeting notes\n- ship the adapter\n- ask about the base model\n"),  # KeyError: 101
    (CONVERT_PTH, "iter_1.pth", TEXT),  # /etc/passwd: IndexError inside torch's weights-only unpickler
    (CONVERT_PTH, "iter_1.pth", random.Random(3000).randbytes(3000)),  # /dev/urandom: IndexError: pop from empty list
    (MERGE, "adapter/adapter_model.safetensors", ("truncate", 5000)),  # SafetensorError
    (MERGE, "adapter/adapter_model.safetensors", ("flip", [8, 9, 10])),  # damaged header: SafetensorError
    (MERGE, "adapter/adapter_config.json", b"r: 16\nlora_alpha: 32\n"),  # JSONDecodeError
    (MERGE, "adapter/adapter_config.json", json_edit(r="sixteen", lora_alpha=None)),  # KeyError: 'lora_alpha'
]


@pytest.mark.parametrize("target, rel, what", REPORTED, ids=range(len(REPORTED)))
def test_reported_cases_give_one_line_and_exit_2(target, rel, what, pristine, tmp_path, capsys, monkeypatch):
    failure = run_case(pristine, tmp_path, target, rel, what, 0, capsys, monkeypatch, expect_error=True)
    assert failure is None, failure


def test_damaged_data_cache_is_encoded_again(pristine, tmp_path, capsys, monkeypatch):
    """The encoded-data cache is ours and disposable: a damaged entry is re-encoded, with a note, not an error."""
    from common.dataset import cache_dir

    train = Target("train", ["train", "recipe.yaml", "--dry-run", "data.max_length=96"], [], printed("records"))
    assert run_case(pristine, tmp_path, train, None, None, 0, capsys, monkeypatch) is None
    entries = [d for d in cache_dir().iterdir() if (d / "meta.json").is_file()]
    newest = max(entries, key=lambda d: d.stat().st_mtime)
    (newest / "meta.json").write_text('{"notes": [], "skipped": [], "stats": {"records": "x"', encoding="utf-8")
    monkeypatch.chdir(tmp_path / "case")
    try:
        assert run_script(train.argv) == 0
    finally:
        monkeypatch.undo()
    out = capsys.readouterr()
    assert "records" in out.out and "cache" in out.err and "damaged" in out.err
    assert json.loads((newest / "meta.json").read_text(encoding="utf-8"))["stats"]["records"] == 4


def test_loss_plot_skips_a_metrics_line_cut_short(tmp_path):
    """A run killed mid-write leaves half a line in metrics.jsonl; the resumed run's plot must still be drawn."""
    from common.callbacks import plot_metrics

    rows = [{"step": s, "loss": 2.0 - s / 10, "lr": 1e-4} for s in range(1, 4)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo'
    (tmp_path / "metrics.jsonl").write_text(text, encoding="utf-8")
    assert plot_metrics(tmp_path).stat().st_size > 0


def test_damaged_checkpoint_is_refused_before_resuming(tmp_path):
    """--resume opens every file of the checkpoint first: damage anywhere is one line naming the file."""
    from common.artifacts import resolve_resume
    from common.cli import UserError

    ckpt = tmp_path / "run" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    torch.save({"state": {0: {"exp_avg": torch.randn(64, 8)}}, "param_groups": []}, ckpt / "optimizer.pt")
    torch.save({"python": 1, "cpu": torch.random.get_rng_state()}, ckpt / "rng_state.pth")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    from safetensors.torch import save_file
    save_file({"w": torch.randn(16, 16)}, ckpt / "adapter_model.safetensors")
    assert resolve_resume(tmp_path / "run", "auto") == str(ckpt)
    rng = random.Random(SEED)
    # flips: the middle of optimizer.pt is tensor data, under a CRC (JSON and safetensors data carry no checksum)
    mutations = [(name, ("truncate", rng.randrange(1, (ckpt / name).stat().st_size)))
                 for name in ("optimizer.pt", "rng_state.pth", "trainer_state.json", "adapter_model.safetensors")]
    mutations.append(("optimizer.pt", ("flip", [(ckpt / "optimizer.pt").stat().st_size // 2])))
    for name, what in mutations:
        pristine = (ckpt / name).read_bytes()
        damage(ckpt / name, what, rng)
        with pytest.raises(UserError, match=name):
            resolve_resume(tmp_path / "run", "auto")
        (ckpt / name).write_bytes(pristine)


def test_weights_missing_a_tensor_are_refused_not_filled_with_noise(pristine, tmp_path, capsys, monkeypatch):
    """transformers initialises a tensor the checkpoint lacks at random and only warns; chat must refuse instead."""
    from safetensors.torch import load_file, save_file

    def drop_norm(file: Path) -> str:
        tensors = load_file(file)
        del tensors["model.norm.weight"]
        save_file(tensors, file, metadata={"format": "pt"})
        return "model.norm.weight removed"

    chat = Target("chat", ["chat", "base", "--once", "hi", "--max-new-tokens", "2", "--temperature", "0",
                           "--prompt-template", "qwen_chat"], [], printed())
    failure = run_case(pristine, tmp_path, chat, "base/model.safetensors", drop_norm, 0, capsys, monkeypatch,
                       expect_error=True)
    assert failure is None, failure
