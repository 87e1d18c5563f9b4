"""The training speed-ups keep the loss exact: the LM head run only at labelled positions gives SFTTrainer's own loss
and gradients, on packed rows (position ids restarting per sample) and on padded batches."""
import sys
from pathlib import Path

import pytest
import torch
from trl import SFTTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.templates import IGNORE  # noqa: E402


def _trainer(tmp_path, model_dir, tokenizer, pack: bool, lora: bool):
    from common.modeling import load_model
    from common.recipe import from_dict
    from common.training import build_trainer

    recipe = from_dict({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0} if lora else None,
        "data": {"path": "unused.json", "max_length": 96, "pack": pack, "shuffle_before_pack": False},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 2, "max_steps": 1},
    })
    torch.manual_seed(0)
    samples = []
    for n in (30, 41, 35, 20):
        ids = torch.randint(10, len(tokenizer), (n,)).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE] * 9 + ids[9:n - 3] + [IGNORE] * 3})
    model = load_model(recipe, torch.float32)
    if lora:  # a non-zero B, so the adapter's gradient path is exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return build_trainer(recipe, model, tokenizer, samples, None, [], torch.float32, disable_tqdm=True)


def _loss_and_grads(trainer, batch, fn):
    trainer.model.zero_grad()
    loss = fn(trainer, trainer.model, dict(batch), num_items_in_batch=None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("pack,lora", [(True, True), (False, True), (True, False)])
def test_labelled_head_matches_the_full_loss(tmp_path, tiny_model_dir, tokenizer, pack, lora):
    from common.training import Trainer

    trainer = _trainer(tmp_path, tiny_model_dir, tokenizer, pack, lora)
    assert trainer.labelled_head
    data = trainer.train_dataset
    batch = trainer.data_collator([data[i] for i in range(min(2, len(data)))])
    if pack:
        assert "attention_mask" not in batch and batch["position_ids"][0, 0] == 0
    else:
        assert (batch["labels"] == IGNORE).any(dim=1).all()  # padded rows
    fast, fast_grads = _loss_and_grads(trainer, batch, Trainer.compute_loss)
    full, full_grads = _loss_and_grads(trainer, batch, SFTTrainer.compute_loss)
    assert abs(fast - full) < 1e-5, (fast, full)
    assert fast_grads.keys() == full_grads.keys() and fast_grads
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Sensitivity: labels one position off (a wrong shift) give other gradients, so the comparison above can fail.
    moved = dict(batch, labels=batch["labels"].roll(1, dims=1))
    _, moved_grads = _loss_and_grads(trainer, moved, Trainer.compute_loss)
    assert any(not torch.allclose(moved_grads[n], full_grads[n], rtol=1e-2, atol=1e-5) for n in full_grads)

