"""train.method grpo on TRL's `GRPOTrainer`, its loss untouched. What is ours:

- The prompts' tokens. TRL would render a conversational prompt through the tokenizer's chat template and tokenize
  the text; ours are encoded by the recipe's template piece by piece, token for token as SFT and chat encode them
  (common/prompts.py). TRL's public `rollout_func` hook hands each batch's prompts (their messages) to `Rollout`,
  which returns our ids with the completions.
- The completions. `grpo.fast_rollouts` (the default) samples them with the project's batched decoder
  (common/decoding.py): a group's prompt is prefilled once and its cache shared by the group's completions (TRL's
  `generate()` path prefills each copy); each completion is a row of one batch that advances one token per model
  forward, and leaves the batch as soon as it ends (generate() decodes every row until the longest ends). Tokens are
  picked with the logits processors generate() builds from TRL's own GenerationConfig (temperature, top-k/p, min-p,
  repetition penalty), so they follow the same distribution; the model is unwrapped and its gradient checkpointing
  switched off for the rollout by TRL's `unwrap_model_for_generation`, as TRL's path does. On the CPU the batch
  steps through the model's compiled decode step (common/decode_step.py, built once per model shape in the
  background at the first rollout; until it is ready, and wherever it does not apply, eagerly): it reads the live
  weights, so each rollout samples from the policy as trained so far. Not while a dropout is active (the package is
  traced without one). With fast_rollouts off,
  TRL's own generation (`_generate_single_turn`) samples them from our ids.
- The rewards (common/rewards.py) are TRL reward functions; TRL weights them (`reward_weights`), sums them and logs
  each on its own. A judge's lost samples are logged per step (`rewards/judge/lost`) and summed up at the end.

Everything else a run does (checkpoints, rotation, resume, Ctrl-C, evaluation prompts, metrics, TensorBoard, final/)
comes from `training.run_arguments` and the run's callbacks, as for every method.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from common.prompts import messages_prompt_ids


class Rollout:
    """TRL's rollout function: prompts (a batch's messages, each repeated once per completion of its group) -> our
    prompt ids and a completion for each."""

    def __init__(self, tokenizer, template, fast: bool):
        self.tokenizer, self.template, self.fast = tokenizer, template, fast
        self.tokens = 0  # completion tokens sampled (the bench's tokens/s)
        self.seconds = 0.0
        self.step = None  # (model, its compiled decode step or None), made at the first rollout

    def __call__(self, prompts: list, trainer) -> dict:
        import time

        start = time.perf_counter()
        prompt_ids = [messages_prompt_ids(self.tokenizer, self.template, p) for p in prompts]
        if self.fast:
            completion_ids = self.sample(trainer, prompt_ids)
        else:  # TRL's own generation from our ids (a private method: tests/test_upstream.py)
            mode = "train" if trainer.model.training else "eval"
            generations = trainer.num_generations if mode == "train" else trainer.num_generations_eval
            completion_ids, _ = trainer._generate_single_turn(prompt_ids, None, {}, generations)
        self.tokens += sum(len(c) for c in completion_ids)
        self.seconds += time.perf_counter() - start
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    def sample(self, trainer, prompt_ids: list[list[int]]) -> list[list[int]]:
        from trl.models.utils import unwrap_model_for_generation

        from common.decoding import Decoder, Row

        config, eos = trainer.generation_config, frozenset(trainer.eos_token_ids)
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                         gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                                         generation_kwargs=trainer.generation_kwargs,
                                         gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs
                                         ) as model, torch.no_grad():
            decoder = Decoder(model, fast=self.compiled_step(model))
            rows = []
            for start, end in groups(prompt_ids):
                ids = list(prompt_ids[start])
                # generate()'s own processor list for TRL's config (a private method: tests/test_upstream.py)
                processors = model._get_logits_processor(config, input_ids_seq_length=len(ids), device=model.device)
                group = [Row(ids, config.max_new_tokens, eos, processors=processors, greedy=False)
                         for _ in range(end - start)]
                decoder.add_alike(group)  # the group's prompt prefilled once
                rows += group
            while decoder.rows:
                decoder.step()
        return [row.answer for row in rows]


    def compiled_step(self, model):
        """The model's FastStep (its package built in the background the first time), or None where it does not
        apply: a dropout active in training mode (the package computes without it), not the CPU, quantized..."""
        from common.decode_step import FastStep

        if model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
            return None
        if self.step is None or self.step[0] is not model:  # (model, its FastStep or None), asked once a model
            self.step = (model, FastStep.for_model(model, build=True))
        return self.step[1]


def groups(prompt_ids: list[list[int]]) -> list[tuple[int, int]]:
    """(start, end) of each run of equal prompts: TRL's sampler lays a group's copies of a prompt side by side."""
    out = []
    for i, ids in enumerate(prompt_ids):
        if out and prompt_ids[out[-1][0]] == ids:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


class RewardsEndCallback(TrainerCallback):
    """The end of the run says what the judges lost (asked, cached, unscored)."""

    def __init__(self, entries, log):
        self.entries, self.log = entries, log

    def on_train_end(self, args, state, control, **kwargs):
        from common.rewards import lost_summary

        for line in lost_summary(self.entries):
            self.log(line)


def grpo_config(recipe, model, dtype, disable_tqdm: bool):
    from trl import GRPOConfig

    from common.training import run_arguments

    g = recipe.grpo
    return GRPOConfig(**run_arguments(recipe, model, dtype, False, disable_tqdm, pack=False),
                      num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                      temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, min_p=g.min_p,
                      repetition_penalty=g.repetition_penalty, beta=g.beta, loss_type=g.loss_type, epsilon=g.epsilon,
                      scale_rewards=g.scale_rewards, num_iterations=g.num_iterations,
                      mask_truncated_completions=g.mask_truncated_completions,
                      reward_weights=[e.weight for e in recipe.rewards])


def build_trainer(recipe, model, fast_paths, tokenizer, train_rows, eval_rows, callbacks, dtype, disable_tqdm):
    """TRL's GRPOTrainer on the prompt rows, our rollout and the recipe's rewards, with the run's arguments and
    callbacks. Held-out prompts are eval.py's (their rewards, base vs tuned), not scored during training."""
    import os

    from datasets import Dataset
    from trl import GRPOTrainer

    from common.callbacks import RunLog
    from common.rewards import reward_functions
    from common.templates import get_template
    from common.training import use_run_console

    template = get_template(recipe.data.template)
    log = RunLog(recipe.train.output_dir)
    for entry in recipe.rewards:  # the judges log their lost samples into the run's log
        if getattr(entry.settings, "client", None) is not None:
            entry.settings.client.log = log
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func's "experimental" warning: we pin TRL
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions(recipe.rewards, tokenizer, template),
                          args=grpo_config(recipe, model, dtype, disable_tqdm),
                          train_dataset=Dataset.from_dict({"prompt": [r["prompt"] for r in train_rows]}),
                          processing_class=tokenizer, callbacks=[*callbacks, RewardsEndCallback(recipe.rewards, log)],
                          rollout_func=Rollout(tokenizer, template, recipe.grpo.fast_rollouts))
    use_run_console(trainer)
    return trainer
