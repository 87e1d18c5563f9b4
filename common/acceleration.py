"""Faster training steps that compute the same loss: where a step's time went (bench/PROFILE.md) and what it bought.

- Packed attention: in a packed row each sample attends causally to itself only. Run sdpa sample by sample with
  `is_causal` instead of once over the row with a block-diagonal mask: the kernel skips the masked half of every block
  and never computes one sample against another.
- Fused LoRA: `base(x) + scaling * B(A(x))` as one addmm on the base output, so the scaling multiply, the separate B
  output and the addition are not separate passes over a (tokens x out_features) tensor in every projection.
- LM head + loss at labelled positions, in chunks, with the gradient formed in the forward pass (used by
  common.training's Trainer where the head is a plain linear layer).
- Packed pairs (DPO): TRL pads a batch's chosen and rejected sequences side by side, each repeating its prompt. Here
  they run as one packed row instead: per pair, the prompt and chosen answer as a sample and the rejected answer as a
  branch that attends to that same prompt (its position ids continue the prompt's), so a prompt is computed once and
  no padding at all; the outputs of TRL's fused LM head are put back in the batch's layout, where DPOTrainer's loss
  reads them unchanged.

All of them leave what is computed unchanged (the same sums, in other groupings: the loss moves by rounding only,
tested against SFTTrainer's loss in float32) and step aside wherever their conditions do not hold (dropout, DoRA,
several adapters, padding, a KV cache, a head that scales its logits), leaving PEFT's and transformers' own paths.

They are switched by the recipe (`train.fast_paths`: all, none, or a list) and applied in one place, `apply()`, to a
loaded model; what applies is returned as a `FastPaths`, which the Trainer reads for its loss. Off, training is TRL's
SFTTrainer as it comes: its attention, PEFT's LoRA forward and its own loss (what the bench's plain variant runs).
"""
from __future__ import annotations

import inspect
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "sdpa_packed"


@dataclass(frozen=True)
class FastPaths:
    """Which paths a training run uses: the recipe's choice, less what the model or device rules out."""
    packed_attention: bool = False
    fused_lora: bool = False
    labelled_loss: bool = False  # the LM head and the loss at labelled positions only
    chunked_loss: bool = False  # ... in chunks, the gradient formed in the forward pass
    packed_pairs: bool = False  # DPO: a batch's pairs in one row, each prompt once (pack_pairs, installed by the trainer)

    @classmethod
    def chosen(cls, value) -> "FastPaths":
        """From `train.fast_paths`: true (all), false (none) or a list of names (checked with the recipe)."""
        from common.recipe import FAST_PATHS

        names = FAST_PATHS if value is True else value or ()
        return cls(**{name: name in names for name in FAST_PATHS})

    def names(self) -> list[str]:
        return [name for name, on in vars(self).items() if on]


def apply(model, recipe) -> FastPaths:
    """The recipe's fast paths on a loaded (and LoRA-wrapped) model, in place; returns those in effect, which the
    Trainer's loss reads. A recipe's own `model.attn_implementation` is kept as it is."""
    from common.recipe import weights_sharded

    chosen = FastPaths.chosen(recipe.train.fast_paths)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Pairs pack into the policy's forward only: full fine-tuning's reference is another model (unpacked).
    pairs = chosen.packed_pairs and recipe.train.method == "dpo" and recipe.lora is not None
    if chosen.packed_attention and (recipe.data.pack or pairs) and not recipe.model.attn_implementation:
        causal_lm.set_attn_implementation(register_packed_attention())
    fused = chosen.fused_lora and recipe.lora is not None and fuse_lora(model) > 0
    # TRL's fused head scores only labelled positions, in tiles, on CUDA/XPU (Triton); elsewhere it projects every
    # position through the LM head and adds entropy and accuracy over the full vocabulary. This is SFT's loss: the
    # preference trainers score pairs with their own (TRL's) head.
    labelled = (chosen.labelled_loss and recipe.train.method == "sft" and not torch.cuda.is_available()
                and "logits_to_keep" in inspect.signature(causal_lm.forward).parameters)
    packed = causal_lm.config._attn_implementation == PACKED_ATTENTION
    # The chunked loss reads the LM head's weight outside the model's forward, where FSDP and ZeRO-3 hold a shard of it
    chunked = chosen.chunked_loss and not weights_sharded(recipe.train)
    return FastPaths(packed_attention=packed, fused_lora=fused, labelled_loss=labelled,
                     chunked_loss=labelled and chunked and head_is_plain_linear(causal_lm),
                     packed_pairs=pairs and packed)


# ---------------------------------------------------------------- attention, sample by sample

def _segments(position_ids: torch.Tensor, length: int) -> list[tuple[int, int, tuple[int, int] | None]] | None:
    """The samples of one packed row as (start, end, shared), or None when it is not a packed row. A sample starts
    where the position ids restart at 0. Where they fall back to k > 0 instead, a branch starts: it continues the
    first k tokens of the sample before it (a pair's rejected answer after the prompt it shares with the chosen one),
    and `shared` is where those k tokens are in the row."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    pos = position_ids[0]
    starts = [0] + ((pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1).tolist()
    segments, root = [], None  # root: (start, end) of the sample that branches continue
    for start, end, first in zip(starts, starts[1:] + [length], pos[starts].tolist()):
        if first == 0:
            root = (start, end)
            segments.append((start, end, None))
        elif root is not None and first <= root[1] - root[0]:
            segments.append((start, end, (root[0], root[0] + first)))
        else:
            return None
    return segments


def _window_mask(queries: int, keys: int, shared: int, window: int, device) -> torch.Tensor:
    """Which keys each query of a sample (or branch) sees under a sliding window, as transformers' sliding masks
    define it: a key at most window - 1 positions back. Keys are the `shared` prefix (positions 0..shared-1) then the
    queries' own positions (shared...)."""
    q = torch.arange(shared, shared + queries, device=device)[:, None]
    k = torch.cat([torch.arange(shared, device=device), torch.arange(shared, shared + queries, device=device)])[-keys:]
    return (q >= k) & (q - k < window)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' attention-function interface: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out. A layer
    with a sliding window (Gemma 3's local layers, Mistral's, transformers pass `sliding_window`) gets the window's
    band within each sample; a softcapped one (Gemma 2) goes to sdpa, which refuses it, as without this path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = None
    if query.shape[2] == key.shape[2] and dropout == 0.0 and kwargs.get("softcap") is None:
        segments = _segments(kwargs.get("position_ids"), query.shape[2])
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    out = []
    for a, b, shared in segments:
        if shared is None:
            k, v, mask = key[:, :, a:b], value[:, :, a:b], None
            if window is not None and b - a > window:
                mask = _window_mask(b - a, b - a, 0, window, query.device)
            out.append(F.scaled_dot_product_attention(query[:, :, a:b], k, v, attn_mask=mask, is_causal=mask is None,
                                                      scale=scaling, enable_gqa=gqa))
            continue
        # a branch: its queries see the shared prefix whole and themselves causally (a lower-right causal mask)
        k = torch.cat([key[:, :, shared[0]:shared[1]], key[:, :, a:b]], dim=2)
        v = torch.cat([value[:, :, shared[0]:shared[1]], value[:, :, a:b]], dim=2)
        n = shared[1] - shared[0]
        mask = _window_mask(b - a, k.shape[2], n, window if window is not None else k.shape[2] + 1, query.device)
        out.append(F.scaled_dot_product_attention(query[:, :, a:b], k, v, attn_mask=mask, scale=scaling,
                                                  enable_gqa=gqa))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Make `attn_implementation="sdpa_packed"` loadable: our attention, sdpa's mask (used when it steps aside)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


# ---------------------------------------------------------------- DPO's pairs in one row

def _pair_layout(input_ids, attention_mask, labels):
    """A DPO batch (rows 0..B-1 chosen, B..2B-1 rejected, right-padded, labels only on the answers) as one packed row:
    (ids, position ids, labels, index), where index maps each (row, position) of the batch's shifted outputs to its
    place in the packed row's (-1: padding or nothing there). Per pair: prompt + chosen from position 0, then the
    rejected answer as a branch from the prompt's last token (positions p-1...), so the position that predicts its
    first token sees exactly the prompt. None when the batch is not of that shape."""
    if input_ids is None or attention_mask is None or labels is None or input_ids.shape[0] % 2:
        return None
    rows, width = input_ids.shape
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(width, device=input_ids.device)
    if not torch.equal(attention_mask.bool(), positions[None] < lengths[:, None]):  # right-padded, no holes
        return None
    labelled = labels != -100
    firsts = torch.where(labelled.any(dim=1), labelled.int().argmax(dim=1), lengths).tolist()
    lengths, half = lengths.tolist(), rows // 2
    ids, pos, labs, index, offset = [], [], [], torch.full((rows, width - 1), -1, device=input_ids.device), 0
    for c, r in zip(range(half), range(half, rows)):
        p = firsts[c]
        if not (0 < p == firsts[r] < min(lengths[c], lengths[r])) or not torch.equal(input_ids[c, :p], input_ids[r, :p]):
            return None  # the two rows do not share a prompt: not a pair
        for row, start in ((c, 0), (r, p - 1)):  # the sample, then its branch
            n = lengths[row] - start
            ids.append(input_ids[row, start:lengths[row]])
            pos.append(positions[start:lengths[row]])
            labs.append(labels[row, start:lengths[row]])
            index[row, start:lengths[row] - 1] = torch.arange(offset, offset + n - 1, device=input_ids.device)
            offset += n
    return torch.cat(ids)[None], torch.cat(pos)[None], torch.cat(labs)[None], index


def pack_pairs(causal_lm) -> None:
    """Route the fused-head forwards of TRL's DPOTrainer (`fused_lm_head=True`: the policy's and, adapter off, the
    reference's) through one packed row per batch; everything else (generation, a batch of another shape) goes
    through as before. Install after DPOTrainer has added its fused head to the model."""
    from trl.trainer.utils import FusedCausalLMOutput

    forward = causal_lm.forward

    def packed_forward(*args, fused_lm_head=False, **kwargs):
        layout = None
        if fused_lm_head and not args and kwargs.get("inputs_embeds") is None and kwargs.get("shift_labels") is None:
            layout = _pair_layout(kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels"))
        if layout is None:
            return forward(*args, fused_lm_head=fused_lm_head, **kwargs)
        ids, positions, labels, index = layout
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "labels", "position_ids")}
        out = forward(input_ids=ids, position_ids=positions, labels=labels, fused_lm_head=True, **rest)
        keep, at = index >= 0, index.clamp(min=0)
        back = lambda x: None if x is None else torch.where(keep, x[0][at], x.new_zeros(()))  # noqa: E731
        return FusedCausalLMOutput(loss=out.loss, log_probs=back(out.log_probs), entropy=back(out.entropy),
                                   log_sum_sq_probs=back(out.log_sum_sq_probs), mean_logits=back(out.mean_logits),
                                   is_top1=back(out.is_top1), label_mask=back(out.label_mask), aux_loss=out.aux_loss)

    causal_lm.forward = packed_forward


# ---------------------------------------------------------------- LoRA as one addmm

def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    from peft.tuners.lora.layer import Linear

    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.lora_A
            or active[0] in self.lora_variant or not isinstance(self.lora_dropout[active[0]], torch.nn.Identity)):
        return Linear.forward(self, x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x)
    a = F.linear(self._cast_input_dtype(x, self.lora_A[name].weight.dtype), self.lora_A[name].weight)
    # In the adapter's dtype, as PEFT adds the two (a bf16 base and fp32 LoRA weights outside autocast: generation)
    fused = torch.addmm(result.reshape(-1, result.shape[-1]).to(a.dtype), a.reshape(-1, a.shape[-1]),
                        self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return fused.view(result.shape).to(result.dtype)


def fuse_lora(model) -> int:
    """Give every plain LoRA linear (no bias on B, an nn.Linear base) the fused forward; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and type(module.base_layer) is torch.nn.Linear and not module.fan_in_fan_out \
                and all(b.bias is None for b in module.lora_B.values()):
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


# ---------------------------------------------------------------- LM head + cross-entropy, chunked

class LinearCrossEntropy(torch.autograd.Function):
    """CE(h_i @ W^T, t_i) for every row i, for a frozen head W, a chunk of rows at a time. The gradient w.r.t. h is
    formed in the forward pass (softmax - onehot, times W), so the vocabulary-wide logits, log-softmax and their
    gradients are never held all at once and no zero-filled gradient is scattered into."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], target[s:s + chunk]
            # In the head's dtype, as the model computes its logits (under autocast a bf16 head multiplies in bf16),
            # then in float32 for the loss.
            logits = F.linear(h.to(weight.dtype), weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            losses[s:s + chunk] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[s:s + chunk] = F.linear(probs.to(weight.dtype), weight.t())  # as the head's backward would
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output[:, None].to(grad.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int = 1024):
    """Per-row losses (float32) of the head `weight` on `hidden` against `target`."""
    return LinearCrossEntropy.apply(hidden, weight, target, chunk)


@contextmanager
def output_embeddings(causal_lm, module):
    """The model with another output head for the duration (set_output_embeddings is transformers' own switch)."""
    head = causal_lm.get_output_embeddings()
    causal_lm.set_output_embeddings(module)
    try:
        yield
    finally:
        causal_lm.set_output_embeddings(head)


@torch.no_grad()
def head_is_plain_linear(causal_lm) -> bool:
    """Whether logits = hidden @ W^T exactly: a bias-free, frozen linear head, and no scaling or capping of the logits
    after it (asked of the model itself on a short input, so no list of architectures is needed)."""
    head = causal_lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return False
    ids = torch.arange(1, 9, device=head.weight.device)[None] % causal_lm.config.get_text_config().vocab_size
    was_training = causal_lm.training
    causal_lm.eval()
    half = head.weight.dtype in (torch.bfloat16, torch.float16)  # trained under autocast: checked under it
    try:
        with torch.autocast(head.weight.device.type, dtype=head.weight.dtype, enabled=half):
            logits = causal_lm(input_ids=ids, use_cache=False).logits
            with output_embeddings(causal_lm, torch.nn.Identity()):
                hidden = causal_lm(input_ids=ids, use_cache=False).logits
            return torch.equal(torch.nn.functional.linear(hidden, head.weight), logits)
    finally:
        causal_lm.train(was_training)
