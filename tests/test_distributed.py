"""More than one process, on CPU (gloo): two "nodes" launched by torchrun on 127.0.0.1 train, are killed, resume and
write one run directory, and their first losses are those of one process on the same global batch; FSDP2 on CPU
processes (tests/fsdp_cpu.py: what of `train.fsdp` runs without a GPU) and the Trainer arguments `train.fsdp` becomes;
DeepSpeed ZeRO-2/3 where deepspeed is installed. Every launch is bounded by a timeout and leaves no process behind."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from test_train import PROMPTS, adapter_tensors, run, write_recipe  # noqa: E402

LAUNCH = [sys.executable, "-m", "torch.distributed.run"]
# The sum over a batch's labelled tokens in another grouping (two processes, two halves of the batch): float32
# rounding only
LOSS_TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list, cwd: Path, output: Path) -> subprocess.Popen:
    """A launcher in its own session, output to a file, one thread per process (they share two cores)."""
    with open(output, "w") as out:
        return subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                                start_new_session=True)


def descendants(pid: int) -> list[int]:
    """The processes a launcher started: torchrun gives each worker a session of its own, so killing the launcher's
    process group would leave them running."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # it exited meanwhile
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each launcher and every process under it, as when the machines die."""
    pids = [pid for p in procs if p.poll() is None for pid in (p.pid, *descendants(p.pid))]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


def wait(procs: list[subprocess.Popen], outputs: list[Path], timeout: float) -> None:
    try:
        for p in procs:
            p.wait(timeout=max(1.0, timeout))
    finally:  # a hung rendezvous must not leave workers behind
        kill(procs)
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output.read_text()[-3000:]


def two_nodes(tmp_path: Path, recipe: Path, name: str, *args) -> tuple[list[subprocess.Popen], list[Path]]:
    """The two-node launch of docs/distributed.md#what-the-tests-run, both nodes on this machine: node 0's address is
    the rendezvous point, each node runs one process."""
    port = free_port()
    outputs = [tmp_path / f"{name}-node{rank}.out" for rank in (0, 1)]
    procs = [start([*LAUNCH, "--nnodes", 2, "--node-rank", rank, "--rdzv-endpoint", f"127.0.0.1:{port}",
                    "--nproc-per-node", 1, ROOT / "train.py", recipe, *args], tmp_path, out)
             for rank, out in zip((0, 1), outputs)]
    return procs, outputs


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of metrics.jsonl, the first entry of each step (a resumed run logs its steps again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out.setdefault(row["step"], row["loss"])
    return out


def one_process_losses(tmp_path: Path, monkeypatch, tiny_model_dir, data_file) -> dict[int, float]:
    """Steps 1 and 2 of one process with batch 4, the global batch of two processes with batch 2. The second step's
    loss follows one update at the first learning rate, which the schedule's length does not change."""
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, name="one", lora={"dropout": 0.0},
                          train={"batch_size": 4, "max_steps": 2}, evaluation={"prompts": []})
    assert run(recipe) == 0
    return losses(tmp_path / "one")


def assert_same_first_losses(run_dir: Path, expected: dict[int, float]) -> None:
    got = losses(run_dir)
    for step in (1, 2):
        assert abs(got[step] - expected[step]) < LOSS_TOLERANCE, (step, got[step], expected[step])
    assert expected[1] != expected[2]


def test_two_nodes_train_are_killed_resume_and_match_one_process(tmp_path, monkeypatch, tiny_model_dir, data_file):
    """Both nodes killed (SIGKILL, every process) once checkpoint-2 is complete, then launched again with --resume
    auto: one run directory, written by the main process only, and the first two losses equal one process's on the
    same global batch (within LOSS_TOLERANCE)."""
    expected = one_process_losses(tmp_path, monkeypatch, tiny_model_dir, data_file)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, lora={"dropout": 0.0},
                          train={"max_steps": 12, "save_steps": 2, "save_total_limit": 2},
                          evaluation={"prompts": PROMPTS[:1], "every_n_steps": 100})
    out = tmp_path / "recipe"
    procs, outputs = two_nodes(tmp_path, recipe, "first")
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-2").is_dir():  # renamed into place when complete
            assert time.monotonic() < deadline, "no checkpoint-2 after 240 s"
            assert all(p.poll() is None for p in procs), outputs[0].read_text()[-3000:]
            time.sleep(0.01)
    finally:
        kill(procs)
    assert not (out / "final").exists()  # killed mid-run
    killed_at = max(losses(out))
    assert_same_first_losses(out, expected)

    procs, outputs = two_nodes(tmp_path, recipe, "resumed", "--resume", "auto")
    wait(procs, outputs, timeout=240)
    log = (out / "train.log").read_text()
    assert "x 2 process(es)" in log and "resuming from" in log
    assert log.count("step 12/12") == 1  # only the main process writes
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert set(steps) == set(range(1, 13)) and steps[-1] == 12 and killed_at < 12
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]
    # answers at the start, at every save and at the end, once each (a resumed run does not answer its start again)
    assert sorted(p.name for p in (out / "eval_outputs").iterdir()) == sorted(f"step_{n}.txt" for n in range(0, 13, 2))
    assert not list(out.glob(".saving-*"))


# ---------------------------------------------------------------- FSDP


def test_fsdp2_on_cpu_processes_shards_trains_saves_and_loads_back(tmp_path, tiny_model_dir, data_file):
    """tests/fsdp_cpu.py on two gloo processes, LoRA (full_shard) and full fine-tuning (shard_grad_op): each decoder
    layer is a unit and each rank holds half of every weight; the losses and trained weights equal one unsharded
    process's; the gathered state dict is the standard directory, the same files and tensors as one process writes;
    the sharded checkpoint (model and optimizer) loads back exactly."""
    recipes = [write_recipe(tmp_path, tiny_model_dir, data_file, name="lora", lora={"dropout": 0.0},
                            train={"fsdp": "full_shard"}, evaluation={"prompts": []}),
               write_recipe(tmp_path, tiny_model_dir, data_file, name="full", lora=None,
                            train={"fsdp": "shard_grad_op"}, evaluation={"prompts": []})]
    output = tmp_path / "fsdp.out"
    proc = start([*LAUNCH, "--standalone", "--nproc-per-node", 2, ROOT / "tests" / "fsdp_cpu.py", tmp_path / "fsdp",
                  *recipes], tmp_path, output)
    wait([proc], [output], timeout=300)
    for name, trainable, files in (("lora", 28, {"adapter_config.json", "adapter_model.safetensors"}),
                                   ("full", 21, {"config.json", "model.safetensors"})):
        result = json.loads((tmp_path / "fsdp" / name / "result.json").read_text())
        assert result["layers"] == ["LlamaDecoderLayer"] and result["units"] == 2
        assert result["embedding"] == [600, 64] and result["embedding_shard"] == [300, 64]
        assert "chunked_loss" not in result["fast_paths"] and "labelled_loss" in result["fast_paths"]
        assert ("fused_lora" in result["fast_paths"]) == (name == "lora")
        for got, want in zip(result["losses"], result["expected_losses"], strict=True):
            assert abs(got - want) < LOSS_TOLERANCE, (name, result)
        assert len(set(result["losses"])) == 3  # training moved the loss
        assert result["max_weight_difference"] < 1e-5, result
        sharded, reference = tmp_path / "fsdp" / name / "sharded", tmp_path / "fsdp" / name / "reference"
        assert files <= {p.name for p in sharded.iterdir()} == {p.name for p in reference.iterdir()}
        weights = next(iter(sorted(f for f in files if f.endswith(".safetensors"))))
        from safetensors.torch import load_file

        got, want = load_file(str(sharded / weights)), load_file(str(reference / weights))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.allclose(got[key], want[key], atol=1e-5, rtol=0), key
        assert result["dcp_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert result["before_reload_difference"] > 1e-4 and result["reload_difference"] == 0
        assert result["optimizer_states"] == trainable and result["optimizer_reload_difference"] == 0


@pytest.mark.parametrize("mode, reshard", [("full_shard", True), ("shard_grad_op", False)])
def test_train_fsdp_becomes_the_trainers_fsdp2_arguments(tmp_path, tiny_model_dir, data_file, mode, reshard):
    """What the Trainer hands accelerate on a GPU machine: FSDP2, the model's decoder layer as the unit, full state
    dicts in checkpoints (standard directories), FSDP's own activation checkpointing instead of the Trainer's."""
    from accelerate import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    from common.modeling import load_model
    from common.recipe import load_recipe
    from common.training import run_arguments

    path = write_recipe(tmp_path, tiny_model_dir, data_file, train={"fsdp": mode, "gradient_checkpointing": True},
                        evaluation={"prompts": []})
    recipe = load_recipe(path, check_machine=False)  # on this CPU machine train.py refuses train.fsdp
    args = TrainingArguments(**run_arguments(recipe, load_model(recipe, torch.float32), torch.float32, False, True,
                                             True))
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": "LlamaDecoderLayer", "cpu_ram_efficient_loading": False,
        "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": True, "reshard_after_forward": reshard}
    assert not args.activation_checkpointing
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # accelerate takes them as they are
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is reshard


# ---------------------------------------------------------------- DeepSpeed


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (not a requirement: docs/distributed.md#deepspeed)")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_on_cpu_processes(tmp_path, monkeypatch, tiny_model_dir, data_file, stage):
    """ZeRO-2/3 on two CPU processes (DeepSpeed's CPU accelerator, gloo): the first losses equal one process's on the
    same global batch, and a resume from checkpoint-2 ends with the same adapter."""
    expected = one_process_losses(tmp_path, monkeypatch, tiny_model_dir, data_file)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, lora={"dropout": 0.0},
                          train={"deepspeed": stage, "max_steps": 4, "save_steps": 2, "save_total_limit": 2},
                          evaluation={"prompts": []})
    out, outputs = tmp_path / "recipe", [tmp_path / "ds.out", tmp_path / "ds-resumed.out"]
    cmd = [*LAUNCH, "--standalone", "--nproc-per-node", 2, ROOT / "train.py", recipe]
    wait([start(cmd, tmp_path, outputs[0])], outputs[:1], timeout=400)  # a first run compiles DeepSpeed's CPU op
    assert_same_first_losses(out, expected)
    assert f"sharding: DeepSpeed {stage} over 2 processes" in (out / "train.log").read_text()
    whole = adapter_tensors(out / "final")
    wait([start([*cmd, "--resume", out / "checkpoint-2"], tmp_path, outputs[1])], outputs[1:], timeout=300)
    assert "resuming from" in (out / "train.log").read_text()
    resumed = adapter_tensors(out / "final")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.allclose(whole[key], resumed[key], atol=1e-5, rtol=0), key
