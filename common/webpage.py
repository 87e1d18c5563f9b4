"""The web page of `chat.py --serve`: chat, base vs tuned side by side, and the run at a glance, in the same process,
port and key as the API. The page is three static files (common/web/: index.html, app.js, style.css; no build step,
nothing fetched from elsewhere) that talk to the server through:

    GET  /                      the page; /app.js, /style.css (no key: they hold nothing of the model's or the run's)
    POST /v1/chat/completions   the answers, streamed (the tuned model as ID, the base as ID:base: common/server)
    GET  /web/info              the served model: ids, template, context, system prompt and sampling defaults
    GET  /web/run               the run: its recipe, metrics.jsonl's loss and eval loss, eval/report.json
    POST /web/ratings           a preference pair ({"prompt", "chosen", "rejected"}) appended to RUN/ratings.jsonl
    POST /web/thumbs            a chat answer rated up or down ({"prompt", "answer", "good"}), appended there too

The /web routes take the same access check as /v1 (common/server/access.py). Ratings are written in the
conversational layouts the data readers take (checked by their reader before they are written): a rated comparison as
a pair (common/pairs.py), a thumb as a rated answer (common/unpaired.py), side by side in one file, so the ratings are
data for the next run (data.path: RUN/ratings.jsonl): train.method kto reads both, dpo and orpo the pairs.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from common import artifacts
from common.conversation import BadRecord
from common.generation import Generator, Sampling
from common.pairs import read_conversational
from common.unpaired import read_conversational as read_rated
from common.server.body import json_object, read_body
from common.server.errors import ApiError, bad_request

PAGE_DIR = Path(__file__).resolve().parent / "web"
# The page's files, by the path they are served at: a fixed table, so no request path ever reaches the file system.
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
# The page may load only what this server serves: no CDN, font or script from elsewhere, and no inline script.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
MAX_RATING_BYTES = 1 << 20


@dataclass
class Page:
    """What the page shows of the served model and its run (None: a model served without a run)."""

    model: str  # the served id
    base: Optional[str]  # the base's id when the served model is an adapter, else None
    generator: Generator
    sampling: Sampling
    system: Optional[str]
    source: object  # artifacts.ModelSource
    lock: threading.Lock = field(default_factory=threading.Lock)  # one rating written at a time
    counted: tuple[int, int, int] = (0, 0, 0)  # the ratings file's (inode, bytes, lines) when last counted

    @classmethod
    def of(cls, source, model: str, models: dict[str, bool], sampling: Sampling, system: Optional[str],
           generator: Generator) -> Page:
        base = next((name for name, adapter in models.items() if not adapter), None)
        return cls(model, base, generator, sampling, system, source)

    @property
    def run_dir(self) -> Optional[Path]:
        return self.source.run_dir

    @property
    def ratings(self) -> Optional[Path]:
        """Where ratings go: the run directory, else the adapter's (a model served outside a run keeps none)."""
        home = self.run_dir or self.source.adapter
        return home / artifacts.RATINGS_FILE if home else None

    def info(self) -> dict:
        s = self.sampling
        return {"model": self.model, "base": self.base, "source": self.source.name,
                "template": self.generator.template.name, "has_system": self.generator.template.has_system,
                "context": self.generator.max_length, "system": self.system,
                "sampling": {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_new_tokens},
                "ratings": str(self.ratings) if self.ratings else None,
                "run": str(self.run_dir) if self.run_dir else None}

    def run(self) -> dict:
        """The run at a glance, read afresh at each call: the page polls it while training writes metrics.jsonl."""
        if self.run_dir is None:
            return {"run": None, "note": f"{self.source.name} is not part of a training run (no {artifacts.RECIPE_FILE} "
                                         "beside it): there is no recipe, loss curve or evaluation to show"}
        report, report_error = read_report(self.run_dir / artifacts.EVAL_DIR / artifacts.EVAL_REPORT)
        return {"run": str(self.run_dir), "recipe": recipe_rows(self.source.recipe),
                "metrics": read_metrics(self.run_dir / artifacts.METRICS_FILE),
                "finished": (self.run_dir / artifacts.FINAL_DIR).is_dir(),
                "report": report, "report_error": report_error}

    def rate(self, data: dict) -> dict:
        """Append one compared pair to the ratings file."""
        if self.base is None:
            raise ApiError(409, f"{self.model} has no adapter: there is no base vs tuned comparison to rate",
                           code="no_comparison")
        record = {"prompt": data.get("prompt"),
                  "chosen": [{"role": "assistant", "content": data.get("chosen")}],
                  "rejected": [{"role": "assistant", "content": data.get("rejected")}]}
        return {"saved": str(self.ratings), "ratings": self._append(record, read_conversational, "a preference pair")}

    def rate_answer(self, data: dict) -> dict:
        """Append one chat answer rated up (`good`: true) or down to the ratings file, as train.method kto reads it."""
        if self.ratings is None:
            raise ApiError(409, f"{self.model} is served outside a run and without an adapter: there is no run "
                                "directory to keep ratings in", code="no_ratings_file")
        record = {"prompt": data.get("prompt"), "completion": [{"role": "assistant", "content": data.get("answer")}],
                  "label": data.get("good")}
        return {"saved": str(self.ratings), "ratings": self._append(record, read_rated, "a rated answer")}

    def _append(self, record: dict, reader, what: str) -> int:
        """Append one record to the ratings file, in one write to a file opened for appending: a line is never
        interleaved with another or overwritten, and an earlier rating is never lost. Returns the file's lines. The
        record is read first by the reader a training run will read it with: refused now (400), not at training."""
        try:
            reader(record)
        except BadRecord as e:
            raise bad_request(f"the rating is not {what}: {e}") from None
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            # Appending: each write lands at the end, whoever else appends; readable too, for the count.
            fd = os.open(self.ratings, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"{self.ratings}: only {written} of {len(line)} bytes written (disk full?)")
                return self._count_lines(fd)
            finally:
                os.close(fd)

    def _count_lines(self, fd: int) -> int:
        """The ratings file's lines: those counted before, plus the newlines in the bytes added since (this rating,
        and whatever another writer appended). The whole file is read once, or again only if it was replaced."""
        stat = os.fstat(fd)
        inode, size, lines = self.counted
        if stat.st_ino != inode or stat.st_size < size:
            size, lines = 0, 0
        while size < stat.st_size:
            chunk = os.pread(fd, min(stat.st_size - size, 1 << 20), size)
            if not chunk:
                break
            size, lines = size + len(chunk), lines + chunk.count(b"\n")
        self.counted = (stat.st_ino, size, lines)
        return lines


def recipe_rows(recipe) -> list[list[str]]:
    """The recipe as the page's table: what was trained, on what, how."""
    m, d, t = recipe.model, recipe.data, recipe.train
    if recipe.lora is None:
        method = "full fine-tuning"
    else:
        kind = "QLoRA" if m.quantization == "4bit" else "LoRA" + (f" ({m.quantization})" if m.quantization else "")
        method = f"{kind} r={recipe.lora.r} alpha={recipe.lora.alpha}"
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"
    rows = [["model", m.path + (f" + adapter {m.adapter}" if m.adapter else "")],
            ["method", f"{t.method}, {method}"], ["template", d.template],
            ["data", ", ".join(d.paths)], ["held-out data", ", ".join(d.eval_paths) or
                                            (f"{d.eval_fraction:.0%} of the data" if d.eval_fraction else "none")],
            ["max_length", str(d.max_length)],
            ["steps", f"{steps}, batch {t.batch_size} x {t.grad_accum} accumulated, lr {t.lr:g} ({t.scheduler})"]]
    if d.system:
        rows.append(["system prompt", d.system])
    return rows


def read_metrics(path: Path) -> dict:
    """metrics.jsonl's loss and eval loss as [step, value] points. A line that does not parse is skipped: the last
    one may be half-written by a run still training."""
    loss, eval_loss = [], []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            continue
        for name, points in (("loss", loss), ("eval_loss", eval_loss)):
            if isinstance(record.get(name), (int, float)):
                points.append([record["step"], record[name]])
    return {"loss": loss, "eval_loss": eval_loss}


def read_report(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """(eval.py's report, None), (None, what is wrong with it), or (None, None) when there is none."""
    if not path.is_file():
        return None, None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{path}: cannot read ({type(e).__name__}: {e})"
    if not isinstance(report, dict):
        return None, f"{path}: not an eval.py report (expected a JSON object)"
    return report, None


def add_routes(app: FastAPI, check, page: Page) -> None:
    """The page's files, and its /web endpoints behind `check` (the API's access check)."""
    for route, (name, media) in ASSETS.items():
        def asset(name=name, media=media):
            return FileResponse(PAGE_DIR / name, media_type=media, headers=PAGE_HEADERS)
        app.add_api_route(route, asset, methods=["GET"], include_in_schema=False)

    web = APIRouter(prefix="/web", dependencies=[Depends(check)])

    @web.get("/info")
    async def info():
        return page.info()

    @web.get("/run")
    def run():  # reads files: a worker thread, not the event loop
        return page.run()

    @web.post("/ratings")
    async def ratings(request: Request):
        data = json_object(await read_body(request, MAX_RATING_BYTES))
        return await run_in_threadpool(page.rate, data)  # writes a file: a worker thread, not the event loop

    @web.post("/thumbs")
    async def thumbs(request: Request):
        data = json_object(await read_body(request, MAX_RATING_BYTES))
        return await run_in_threadpool(page.rate_answer, data)

    app.include_router(web)
