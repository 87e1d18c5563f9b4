"""Who may use the API: `Authorization: Bearer KEY` when the server has a key, else the checks that keep other
sites' web pages out (access_check); and where the key comes from (api_key_from)."""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from starlette.requests import Request

from common.cli import UserError, reading
from common.server import API_KEY_ENV
from common.server.errors import ApiError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WILDCARD = {"0.0.0.0", "::", ""}  # every interface: no one name the server is addressed by


def access_check(api_key: Optional[str], host: str):
    """A dependency for the /v1 routes: `Authorization: Bearer KEY` when the server has a key, else the checks that
    keep web pages out (as Ollama and Jupyter do). Any page the user opens may POST to 127.0.0.1 without a CORS
    preflight, if the request looks like a form (text/plain, no custom header), and a DNS-rebinding page may reach it
    under its own host name. So a keyless server answers only requests addressed to its own name (`Host`), from no
    page or a page of this machine (`Origin`), and POSTs only as application/json, which browsers do not send
    cross-site without a preflight that this server does not grant."""
    names = None if host in WILDCARD else LOOPBACK | {host.strip("[]").lower()}

    async def check(request: Request) -> None:
        if api_key is None:
            return same_site(request, names)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "missing API key: send the header `Authorization: Bearer KEY`", code="invalid_api_key")
        if not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    return check


def same_site(request: Request, names: Optional[set[str]]) -> None:
    """The keyless server's checks (access_check); `names`: the host names it answers to, None for any."""
    addressed = urlsplit("//" + request.headers.get("host", "")).hostname or ""
    if names is not None and addressed not in names:
        raise ApiError(403, f"the request is addressed to host `{addressed}`, not to this server's address "
                            "(a keyless server answers only its own; set an API key to serve other names)",
                       type="permission_error", code="host_not_allowed")
    origin = request.headers.get("origin")
    if origin is not None and (urlsplit(origin).hostname or "") not in (names or {addressed}) | LOOPBACK:
        raise ApiError(403, f"cross-origin request from `{origin}` refused: a keyless server answers no web page "
                            "but this machine's (set an API key to allow others)",
                       type="permission_error", code="cross_origin")
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if request.method == "POST" and media != "application/json":
        raise ApiError(415, f"the body must be sent as `Content-Type: application/json`, not `{media or 'nothing'}`",
                       code="unsupported_media_type")


def api_key_from(flag: Optional[str], file: Optional[str], environ=os.environ) -> Optional[str]:
    """The key from --api-key, --api-key-file or $SFT_API_KEY (in that order; None: serve without a key). The flag
    still works but is visible to every user of the machine, in `ps` and /proc/PID/cmdline."""
    if flag is not None:
        print(f"warning: --api-key is visible to other users of this machine (ps, /proc/PID/cmdline): use "
              f"--api-key-file PATH or ${API_KEY_ENV} instead", file=sys.stderr, flush=True)
        return flag
    if file is not None:
        with reading(file, "cannot read the API key"):
            lines = Path(file).read_text(encoding="utf-8").strip().splitlines()
        if len(lines) != 1 or not lines[0].strip():
            raise UserError(f"{file}: expected the API key on one line, found {len(lines)} lines")
        return lines[0].strip()
    return environ.get(API_KEY_ENV) or None
