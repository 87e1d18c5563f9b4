"""The request body, before anything reads its fields: refused with 413 as soon as it is known to exceed the limit
(nothing over it is kept, parsed or tokenized), then decoded as strict UTF-8 JSON with what a tokenizer or a later
json.dumps would fail on refused up front (deep nesting, lone surrogates). Shared by the API and the web page."""
from __future__ import annotations

import json

from starlette.requests import ClientDisconnect, Request

from common.server.errors import ApiError, bad_request

MAX_DEPTH = 32  # nesting of the body's JSON: a chat request needs 4 (body, messages, message, content part)


class ClientGone(Exception):
    """The client closed the connection before its request body was complete: nobody to answer."""


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 by its Content-Length before any of it is read, else (chunked) at the chunk that
    crosses `limit`."""
    too_big = ApiError(413, f"the request body is larger than the server's limit of {limit} bytes "
                            "(chat.py --max-request-bytes)", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def json_object(body: bytes) -> dict:
    """A request body -> its JSON object, or a 400 saying what is wrong with it (check_values: depth, surrogates)."""
    try:
        text = body.decode("utf-8")  # strict: JSON is UTF-8, and json.loads(bytes) would let encoded surrogates in
    except UnicodeDecodeError as e:
        raise bad_request(f"the body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    try:
        data = json.loads(text)
    except RecursionError:  # the decoder recurses per level: thousands of [ end it there, cheaply
        raise bad_request(f"the body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    check_values(data)
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, got {json_type(data)}")
    return data


def check_values(data) -> None:
    """Refuse what a tokenizer or a later json.dumps would fail on, naming where it is: nesting beyond MAX_DEPTH,
    and strings holding a lone surrogate (JSON's "\\ud800" escapes decode to one; UTF-8 cannot encode it)."""
    pending = [(data, "the body", 0, None)]  # (value, where it is, its depth, the top-level field holding it)
    while pending:  # a loop, not recursion: the depth is what is being checked
        value, where, depth, param = pending.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"the body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise bad_request(f"{where}: a lone surrogate (\\u{ord(value[e.start]):04x}) at character {e.start} "
                                  "is not text", param) from None
        elif isinstance(value, dict):
            for k, v in value.items():
                field = param or k
                pending += [(k, f"a key of {where}", depth + 1, param),  # error messages may quote keys
                            (v, k if depth == 0 else f"{where}.{k}", depth + 1, field)]
        elif isinstance(value, list):
            pending += [(v, f"{where}[{i}]", depth + 1, param) for i, v in enumerate(value)]


def json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
