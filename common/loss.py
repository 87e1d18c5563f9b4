"""The loss at labelled positions: the one definition that training (common.training), eval.py's held-out loss
(common.evaluation) and the bench's trained-token counts use. Position i predicts token i + 1, so a position counts
when the next token carries a label; prompt tokens (label -100) and the last position never do."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.acceleration import linear_cross_entropy, output_embeddings
from common.templates import IGNORE


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """A boolean mask, the shape of `labels`, of the positions where the loss is taken."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def causal_lm_of(model):
    """The transformers model inside DDP's and PEFT's wrappers (whose output head is the LM head)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_losses(model, inputs: dict, chunked: bool = False) -> torch.Tensor:
    """Cross-entropy (float32) at each labelled position of a batch (`labels` plus the model's inputs), in row order.
    The LM head runs only there: in SFT most positions are prompt, so this skips most of the head's matmul and softmax
    (on SmolLM2 the head is a fifth of the model's FLOPs). `chunked`: the head and the loss in chunks, the gradient
    formed in the forward pass (common.acceleration.linear_cross_entropy; for a plain linear head only)."""
    labels = inputs["labels"]
    keep = labelled_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    if chunked:  # the model stops at the hidden states of the labelled positions; head + loss in chunks
        causal_lm = causal_lm_of(model)
        head = causal_lm.get_output_embeddings()
        with output_embeddings(causal_lm, torch.nn.Identity()):
            hidden = model(**forward, use_cache=False, logits_to_keep=keep).logits
        return linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), head.weight, targets)
    logits = model(**forward, use_cache=False, logits_to_keep=keep).logits  # (labelled positions, vocab)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets, reduction="none")
