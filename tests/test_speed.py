"""The training speed-ups keep the loss exact. Against SFTTrainer's own loss on a plain model (transformers' sdpa
attention with the packed-sequence mask, PEFT's LoRA forward, the LM head at every position): our path (attention
sample by sample, LoRA as one addmm, the head and loss at labelled positions only, in chunks) gives the same loss and
gradients, on packed rows (several samples, position ids restarting) and on padded batches."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import acceleration  # noqa: E402
from common.templates import IGNORE  # noqa: E402


def _trainer(tmp_path, model_dir, tokenizer, pack: bool, lora: bool, fast: bool):
    from common.modeling import load_model
    from common.recipe import from_dict
    from common.training import build_trainer

    recipe = from_dict({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0} if lora else None,
        "data": {"path": "unused.json", "max_length": 96, "pack": pack, "shuffle_before_pack": False},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 2, "max_steps": 1, "fast_paths": fast},
    })
    torch.manual_seed(0)
    samples = []
    for n in (30, 41, 35, 20):
        ids = torch.randint(10, len(tokenizer), (n,)).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE] * 9 + ids[9:n - 3] + [IGNORE] * 3})
    model = load_model(recipe, torch.float32)
    paths = acceleration.apply(model, recipe)
    fused = sum("forward" in vars(m) for m in model.modules())  # fuse_lora sets forward on the instance
    assert fused == 0 if not fast else (fused > 0) == lora
    if lora:  # a non-zero B, so the adapter's gradient path is exercised
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return build_trainer(recipe, model, paths, tokenizer, samples, None, [], torch.float32, disable_tqdm=True)


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("pack,lora", [(True, True), (False, True), (True, False)])
def test_fast_paths_match_the_plain_loss(tmp_path, tiny_model_dir, tokenizer, pack, lora):
    """`train.fast_paths: true` against `false` (SFTTrainer's own loss, sdpa with the packed mask, PEFT's forward)."""
    fast = _trainer(tmp_path, tiny_model_dir, tokenizer, pack, lora, fast=True)
    plain = _trainer(tmp_path, tiny_model_dir, tokenizer, pack, lora, fast=False)
    # full fine-tuning trains the head: not chunked
    assert fast.fast_paths == acceleration.FastPaths(packed_attention=pack, fused_lora=lora, labelled_loss=True,
                                                     chunked_loss=lora)
    assert plain.fast_paths == acceleration.FastPaths()
    assert fast.model.config._attn_implementation == (acceleration.PACKED_ATTENTION if pack else "sdpa")
    assert plain.model.config._attn_implementation == "sdpa"
    data = fast.train_dataset
    batch = fast.data_collator([data[i] for i in range(min(2, len(data)))])
    if pack:
        assert "attention_mask" not in batch and int((batch["position_ids"] == 0).sum()) >= 2  # several samples
    else:
        assert (batch["labels"] == IGNORE).any(dim=1).all()  # padded rows
    ours, our_grads = _loss_and_grads(fast, batch)
    full, full_grads = _loss_and_grads(plain, batch)
    assert abs(ours - full) < 1e-5, (ours, full)
    assert our_grads.keys() == full_grads.keys() and our_grads
    for name in full_grads:
        torch.testing.assert_close(our_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Sensitivity: labels one position off (a wrong shift) give other gradients, so the comparison above can fail.
    moved = dict(batch, labels=batch["labels"].roll(1, dims=1))
    _, moved_grads = _loss_and_grads(fast, moved)
    assert any(not torch.allclose(moved_grads[n], full_grads[n], rtol=1e-2, atol=1e-5) for n in full_grads)


def test_fast_paths_one_by_one(tmp_path, tiny_model_dir, tokenizer):
    """A list turns on exactly the paths it names; chunked_loss without labelled_loss is refused with the recipe."""
    from common.cli import UserError
    from common.modeling import load_model
    from common.recipe import from_dict

    raw = {"model": {"path": str(tiny_model_dir), "dtype": "float32"}, "lora": {"r": 4, "dropout": 0.0},
           "data": {"path": "unused.json", "max_length": 96}, "train": {"output_dir": str(tmp_path / "run")}}
    for names in (["packed_attention"], ["fused_lora"], ["labelled_loss"], ["labelled_loss", "chunked_loss"]):
        recipe = from_dict({**raw, "train": {**raw["train"], "fast_paths": names}})
        assert acceleration.apply(load_model(recipe, torch.float32), recipe).names() == names
    with pytest.raises(UserError, match="chunked_loss is a way of computing labelled_loss"):
        from_dict({**raw, "train": {"fast_paths": ["chunked_loss"]}})
    with pytest.raises(UserError, match="fast_paths"):
        from_dict({**raw, "train": {"fast_paths": ["packed_attn"]}})


def test_packed_attention_keeps_samples_apart_and_steps_aside_when_decoding(tiny_model_dir):
    """A sample's outputs do not depend on what is packed before it; with a KV cache the usual sdpa path runs."""
    from transformers import AutoModelForCausalLM

    name = acceleration.register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=name).eval()
    a, b = torch.randint(10, 300, (1, 17)), torch.randint(10, 300, (1, 23))
    with torch.no_grad():
        alone = model(input_ids=b, position_ids=torch.arange(23)[None], use_cache=False).logits
        packed = model(input_ids=torch.cat([a, b], 1), use_cache=False,
                       position_ids=torch.cat([torch.arange(17), torch.arange(23)])[None]).logits
        torch.testing.assert_close(packed[:, 17:], alone, rtol=1e-5, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
        out = model.generate(b, max_new_tokens=5, do_sample=False)
        assert torch.equal(out, plain.generate(b, max_new_tokens=5, do_sample=False))


def test_linear_cross_entropy_equals_the_plain_loss():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    target = torch.randint(0, 50, (37,))
    ours = acceleration.linear_cross_entropy(hidden, weight, target, chunk=8)  # per row
    scale = torch.rand(37)  # a weighted sum: each row's own gradient is checked
    (grad,) = torch.autograd.grad((ours * scale).sum(), hidden)
    hidden2 = hidden.detach().clone().requires_grad_()
    plain = torch.nn.functional.cross_entropy(hidden2 @ weight.t(), target, reduction="none")
    (plain * scale).sum().backward()
    assert torch.allclose(ours, plain.detach(), atol=1e-5) and torch.allclose(grad, hidden2.grad, atol=1e-5)
