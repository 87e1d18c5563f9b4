"""FSDP2 on CPU processes (gloo): what of `train.fsdp` can run without a GPU, on the model train.py builds.

accelerate 1.15 applies FSDP only on accelerator devices (a CPU launch trains data-parallel), so the Trainer's FSDP
path needs a GPU. torch's own FSDP2 runs on CPU, though, and this checks the parts that are ours: each rank loads the
recipe's model as train.py does (LoRA, the fast paths in effect under FSDP), shards it by the decoder layer that
`common.training.decoder_layers` finds (the unit handed to the Trainer), trains a few steps with the run's loss on
its half of each global batch, then
  - compares the losses and the trained adapter with one unsharded process on the whole batches (an unsharded copy
    of the same model, trained first in the same process),
  - gathers the full state dict and writes it as the standard adapter or model directory (save_pretrained), and
  - saves the sharded model and optimizer with torch.distributed.checkpoint and loads them back into a fresh model.

    torchrun --standalone --nproc-per-node 2 tests/fsdp_cpu.py OUT_DIR RECIPE [RECIPE ...]

For each recipe (LoRA, full fine-tuning) rank 0 writes OUT_DIR/<recipe name>/: result.json, sharded/ (the directory
written from the gathered state dict) and reference/ (the unsharded process's); tests/test_distributed.py reads them.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import acceleration  # noqa: E402
from common.methods import table as methods  # noqa: E402
from common.loss import token_losses  # noqa: E402
from common.modeling import load_model, recipe_tokenizer  # noqa: E402
from common.recipe import load_recipe  # noqa: E402
from common.samples import pack_rows  # noqa: E402
from common.training import decoder_layers  # noqa: E402

STEPS = 3


def build(recipe):
    torch.manual_seed(recipe.train.seed)  # the LoRA init, the same on every rank and for the reference
    model = load_model(recipe, torch.float32)
    return model, acceleration.apply(model, recipe)


def train(model, paths, batches, world: int) -> list[float]:
    """Steps of the run's loss (common.loss, the labelled positions) over `batches`, one list of inputs per step
    (this rank's part); the loss is the sum over every rank's labelled tokens / their global count, as the Trainer's."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for inputs in batches:
        token = token_losses(model, inputs, paths.chunked_loss)
        count = torch.tensor(float(token.numel()))
        total = token.sum().detach()
        if world > 1:
            dist.all_reduce(count)
            dist.all_reduce(total)
        # FSDP averages gradients over the ranks; times `world` makes that the gradient of the global sum / count
        (token.sum() / count * world).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(total / count))
    return losses, optimizer


def difference(a: dict, b: dict) -> float:
    """The largest difference between two state dicts' sharded tensors, each gathered whole (an optimizer's step
    counts are plain tensors: left out)."""
    from torch.distributed.tensor import DTensor

    return max((a[k].full_tensor() - b[k].full_tensor()).abs().max().item() for k in b if isinstance(b[k], DTensor))


def main(out: str, *recipes: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for recipe_path in recipes:
        check(recipe_path, Path(out) / Path(recipe_path).stem, mesh)
    dist.destroy_process_group()


def check(recipe_path: str, out: Path, mesh) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    from torch.distributed.fsdp import fully_shard
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = load_recipe(recipe_path, check_machine=False)  # train.fsdp on a CPU: train.py would refuse it
    tokenizer = recipe_tokenizer(recipe)
    train_rows, _, _ = methods.get("sft").build_datasets(recipe, tokenizer)
    rows = pack_rows(train_rows, recipe.data.max_length, False, recipe.train.seed)
    collate = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)
    per_rank = recipe.train.batch_size
    global_rows = [[rows[i] for i in range(step * per_rank * world, (step + 1) * per_rank * world)]
                   for step in range(STEPS)]
    whole = [collate(b) for b in global_rows]
    mine = [collate(b[rank * per_rank:(rank + 1) * per_rank]) for b in global_rows]

    reference, paths = build(recipe)
    expected, _ = train(reference, paths, whole, world=1)

    model, paths = build(recipe)
    layers = decoder_layers(model)
    units = [m for m in model.modules() if type(m).__name__ in layers]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=recipe.train.fsdp == "full_shard")
    fully_shard(model, mesh=mesh, reshard_after_forward=recipe.train.fsdp == "full_shard")
    embed = model.get_input_embeddings().weight
    got, optimizer = train(model, paths, mine, world)

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    unsharded = reference.state_dict()
    differs = max((full[k] - unsharded[k]).abs().max().item() for k in full) if rank == 0 else None
    if rank == 0:  # the standard adapter (or model) directory, as final/ holds it
        model.save_pretrained(out / "sharded", state_dict=full)
        reference.save_pretrained(out / "reference")

    sharded, optim = get_state_dict(model, optimizer)
    dcp.save({"model": sharded, "optim": optim}, checkpoint_id=str(out / "dcp"))
    fresh, _ = build(recipe)
    for unit in [m for m in fresh.modules() if type(m).__name__ in layers]:
        fully_shard(unit, mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    loaded, loaded_optim = get_state_dict(fresh, fresh_optimizer)
    before = difference(loaded, sharded)  # a fresh LoRA (B = 0) against the trained one: not yet equal
    dcp.load({"model": loaded, "optim": loaded_optim}, checkpoint_id=str(out / "dcp"))
    reloaded = difference(loaded, sharded)
    reloaded_optim = max(difference(loaded_optim["state"][k], optim["state"][k]) for k in optim["state"])
    if rank == 0:
        (out / "result.json").write_text(json.dumps({
            "world": world, "layers": layers, "units": len(units), "fast_paths": paths.names(),
            "expected_losses": expected, "losses": got, "max_weight_difference": differs,
            "before_reload_difference": before, "reload_difference": reloaded, "optimizer_reload_difference":
            reloaded_optim, "optimizer_states": len(optim["state"]), "embedding_shard": list(embed.to_local().shape),
            "embedding": list(embed.shape), "dcp_files": sorted(p.name for p in (out / "dcp").iterdir())}))


if __name__ == "__main__":
    main(*sys.argv[1:])
