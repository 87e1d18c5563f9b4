"""The OpenAI chat request -> ChatRequest (what to generate), as plain functions: each field checked on its own, a
bad one an ApiError (400) whose param names it, before the request waits for the model. The checks that need the
tokenizer (a prompt too long for the context) happen where it is rendered, in the worker."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

from common.conversation import OPENAI_ROLES, BadRecord, messages_to_turns
from common.generation import Sampling, no_room
from common.server.body import json_object, json_type
from common.server.errors import ApiError, bad_request

SEED_LIMIT = 2 ** 63  # torch.manual_seed takes 64-bit seeds; OpenAI's seed is a non-negative integer
BASE_SUFFIX = ":base"  # the model id that asks an adapter run's base: the same load with the adapter switched off
ROLES = {**OPENAI_ROLES, "developer": "system"}  # `developer`: OpenAI's newer name for the system message
# OpenAI fields this server does not implement: refused by name rather than silently ignored, when set to anything
# but their "off" value (null, false, 0, an empty list or object).
UNSUPPORTED = {
    "tools": "tool calls are not implemented", "tool_choice": "tool calls are not implemented",
    "functions": "function calls are not implemented", "function_call": "function calls are not implemented",
    "logprobs": "log probabilities are not returned", "top_logprobs": "log probabilities are not returned",
    "presence_penalty": "no presence penalty is applied (send 0)",
    "frequency_penalty": "no frequency penalty is applied (send 0)",
    "logit_bias": "logit bias is not applied",
}


@dataclass
class ChatRequest:
    messages: list[dict]  # as the model sees them: the server's system prompt added when the client sent none
    sampling: Sampling
    stop: list[str]  # added to the template's stop words for this request
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    adapter: bool = True  # False: the base answers (`model` was ID:base), the adapter switched off
    switches: dict = dataclasses.field(default_factory=dict)  # chat_template_kwargs: {"enable_thinking": bool}


def parse_request(body: bytes, defaults: Sampling, system: Optional[str] = None,
                  context: Optional[int] = None, models: Optional[dict[str, bool]] = None) -> ChatRequest:
    """The request body -> what to generate, or an ApiError (400) that names the offending field. `context`: the
    model's context in tokens, which max_tokens must leave room in. `models`: the ids served, each with whether its
    adapter is on (served_models); a request without `model` asks the served model, one with another id is a 404."""
    data = json_object(body)
    for name, why in UNSUPPORTED.items():
        if data.get(name) not in (None, False, 0, [], {}):
            raise bad_request(f"`{name}` is not supported by this server: {why}", name)
    adapter = model_adapter(data.get("model"), models)
    messages = parse_messages(data.get("messages"))
    if integer(data, "n", minimum=1) not in (None, 1):
        raise bad_request("n > 1 is not supported: the server gives one answer per request", "n")
    max_tokens = integer(data, "max_completion_tokens", minimum=1) or integer(data, "max_tokens", minimum=1)
    problem = no_room(max_tokens, context, "max_tokens") if max_tokens else None
    if problem:
        raise bad_request(problem, "max_tokens")
    sampling = dataclasses.replace(defaults, **{k: v for k, v in {
        "max_new_tokens": max_tokens,
        "temperature": number(data, "temperature", 0, 2),
        "top_p": number(data, "top_p", 0, 1),
        "seed": integer(data, "seed", minimum=0, limit=SEED_LIMIT),
    }.items() if v is not None})
    stream = flag(data, "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request(f"`stream_options` must be an object, got {json_type(options)}", "stream_options")
    include_usage = stream and flag(options or {}, "include_usage", "stream_options.include_usage")
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    return ChatRequest(messages, sampling, stop_words(data.get("stop")), stream, include_usage, adapter,
                       template_switches(data.get("chat_template_kwargs")))


def template_switches(kwargs) -> dict:
    """`chat_template_kwargs` (vLLM's and SGLang's name): the template variables a request may set. Only
    enable_thinking: with false, a template that can (Qwen3's) answers without reasoning and no think block is shown."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise bad_request(f"`chat_template_kwargs` must be an object, got {json_type(kwargs)}", "chat_template_kwargs")
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise bad_request(f"`chat_template_kwargs.{unknown[0]}` is not supported (only enable_thinking)",
                          "chat_template_kwargs")
    if not kwargs:
        return {}
    return {"enable_thinking": flag(kwargs, "enable_thinking", "chat_template_kwargs.enable_thinking")}


def served_models(model: str, adapter: bool) -> dict[str, bool]:
    """The ids /v1/models lists, each with whether the adapter is on: the served model, and for an adapter run its
    base (BASE_SUFFIX), answered by the same load with the adapter switched off."""
    return {model: True, **({model + BASE_SUFFIX: False} if adapter else {})}


def model_adapter(model, models: Optional[dict[str, bool]]) -> bool:
    """Whether the request's `model` has the adapter on; an id that is not served is a 404, as OpenAI answers."""
    if model is None or models is None:
        return True
    if not isinstance(model, str) or model not in models:
        raise ApiError(404, f"the model {json.dumps(model, ensure_ascii=False)} is not served here: use one of "
                            f"{', '.join(models)} (GET /v1/models)", param="model", code="model_not_found")
    return models[model]

def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    try:
        # Roles, string contents and a last user message to answer: the same rules the generation core applies,
        # checked here so that a bad conversation is refused before it waits in the queue.
        messages_to_turns(messages, open_end=True, roles=ROLES)
    except BadRecord as e:
        raise bad_request(str(e), "messages") from None
    return [{**m, "role": ROLES[m["role"]]} for m in messages]



def number(data: dict, name: str, low: float, high: float) -> Optional[float]:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise bad_request(f"`{name}` must be a number from {low} to {high}, got {json.dumps(value)}", name)
    return float(value)


def integer(data: dict, name: str, minimum: int, limit: Optional[int] = None) -> Optional[int]:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (limit and value >= limit):
        bound = f"from {minimum} to {limit - 1}" if limit else f"of at least {minimum}"
        raise bad_request(f"`{name}` must be an integer {bound}, got {json.dumps(value)}", name)
    return value


def flag(data: dict, name: str, param: Optional[str] = None) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"`{param or name}` must be true or false, got {json.dumps(value)}", param or name)
    return value


def stop_words(stop) -> list[str]:
    if stop is None:
        return []
    words = [stop] if isinstance(stop, str) else stop
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise bad_request(f"`stop` must be a string or a list of strings, got {json.dumps(stop)}", "stop")
    return words
