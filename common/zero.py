"""DeepSpeed ZeRO-1/2/3 checkpoints: the full fp32 master weights rebuilt from the per-rank optimizer shards (as
DeepSpeed's zero_to_fp32 does), from already safely unpickled dicts; convert.py's DeepSpeed reader uses it."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from common.cli import UserError


def zero_stage(shard: dict, where: Path) -> int:
    try:
        stage = shard["optimizer_state_dict"]["zero_stage"]
    except (KeyError, TypeError):
        raise UserError(f"{where}: not a ZeRO optimizer shard (no optimizer_state_dict.zero_stage)") from None
    return int(getattr(stage, "value", stage))  # ZeroStageEnum is a stand-in (or an IntEnum under trust)


def zero_fp32_weights(model_state: dict, shards: list[dict], where: Path) -> dict[str, torch.Tensor]:
    """Rebuild full fp32 parameters from ZeRO-1/2/3 shards, in the order of the model states' `param_shapes`."""
    stage = zero_stage(shards[0], where)
    world = shards[0]["optimizer_state_dict"]["partition_count"]
    world = max(world) if isinstance(world, (list, tuple)) else int(world)
    if world != len(shards):
        raise UserError(f"{where}: ZeRO ran on {world} ranks but {len(shards)} *_optim_states.pt files are here; "
                        "a shard is missing or left from another run")
    shapes = model_state.get("param_shapes")
    if not isinstance(shapes, list):
        raise UserError(f"{where}: model states have no `param_shapes`; cannot place the ZeRO shards")
    groups = [[torch.as_tensor(t) for t in s["optimizer_state_dict"][
        "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"]] for s in shards]
    out = _unshard_zero12(shapes, groups, world, where) if stage <= 2 else _unshard_zero3(shapes, groups, world, where)
    for name, partner in (model_state.get("shared_params") or {}).items():  # tied weights are stored once
        if partner in out:
            out[name] = out[partner]
    return out


def _unshard_zero12(shapes, groups, world, where) -> dict[str, torch.Tensor]:
    # Each param group was flattened, padded to a multiple of 2*world, and cut into `world` equal slices.
    out = {}
    for g, group_shapes in enumerate(shapes):
        flat = torch.cat([rank_groups[g] for rank_groups in groups])
        offset = 0
        for name, shape in group_shapes.items():
            n = math.prod(shape)
            out[name] = flat[offset:offset + n].view(tuple(shape)).clone()
            offset += n
        if _align(offset, 2 * world) != _align(flat.numel(), 2 * world):
            raise UserError(f"{where}: param group {g} has {flat.numel()} values in its shards but its shapes "
                            f"need {offset}; the shards do not belong to these model states")
    return out


def _unshard_zero3(shapes, groups, world, where) -> dict[str, torch.Tensor]:
    # Every parameter is split on its own: rank i holds elements [i*k, (i+1)*k) with k = ceil(numel/world),
    # the last slice zero-padded; a rank's flat buffer is its slices of all params in order.
    flats = [torch.cat(rank_groups) for rank_groups in groups]
    out, offset = {}, 0
    for name, shape in ((n, s) for group_shapes in shapes for n, s in group_shapes.items()):
        n = math.prod(shape)
        k = math.ceil(n / world)
        out[name] = torch.cat([f[offset:offset + k] for f in flats])[:n].view(tuple(shape)).clone()
        offset += k
    if offset != flats[0].numel():
        raise UserError(f"{where}: each ZeRO-3 shard has {flats[0].numel()} values but the shapes need {offset}; "
                        "the shards do not belong to these model states")
    return out


def _align(n: int, to: int) -> int:
    return to * math.ceil(n / to)
