"""What every script shares at its edges: one-line errors with exit status 2, never a traceback."""
import difflib
import json
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

# PEFT imports bitsandbytes, which warns on every CPU start about an optional kernel package it can do without.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# PEFT (0.21) still calls transformers' renamed gradient-checkpointing helpers; the warnings say nothing to a user.
warnings.filterwarnings("ignore", message=r".*(is_)?gradient_checkpointing.* is deprecated", category=FutureWarning)


class UserError(Exception):
    """A problem with the user's input. Printed as one line (or one block of lines) and exit status 2."""


def main_guard(fn):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit 2. A KeyboardInterrupt that ends
    main() (a second Ctrl-C) ends the process by SIGINT after its traceback, as Python itself ends it: with scipy
    installed (lm-eval brings it; transformers' loss module imports it), Python 3.11 exits with status 1 instead,
    and a shell or scheduler would take a user's abort for a crash."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            # only a script's own process: main() called from other code (a test, a notebook) gets the exception
            if fn.__module__ != "__main__" or threading.current_thread() is not threading.main_thread():
                raise
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            raise  # not reached: SIGINT's default action ends the process

    return wrapper


def did_you_mean(name: str, options, prefix: str = "", cutoff: float = 0.6, aliases: dict | None = None) -> str:
    """` (did you mean `NAME`?)` for an unknown name: the option an alias stands for (a name users bring from another
    tool), else the closest spelling; "" when nothing is close. `prefix` goes before the suggestion (`train.`)."""
    options = list(options)
    alias = (aliases or {}).get(name)
    match = [alias] if alias in options else difflib.get_close_matches(name, options, n=1, cutoff=cutoff)
    return f" (did you mean `{prefix}{match[0]}`?)" if match else ""


def first_line(e: BaseException) -> str:
    """An exception as one short line; a heading that ends in ':' keeps its first detail (torch's size mismatches,
    pydantic-style validation errors)."""
    lines = [line.strip() for line in (str(e).strip() or type(e).__name__).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]


@contextmanager
def reading(path, what: str):
    """The boundary where a user's file is read: any failure to read or interpret `path` inside the block becomes one
    UserError, `PATH: WHAT (why)`. Put only the reading call inside, so a bug in our own code keeps its traceback."""
    try:
        yield
    except (UserError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    # BaseException: the parsers are libraries (safetensors, tokenizers, torch's unpickler), and tokenizers' Rust
    # panics arrive as pyo3's PanicException, which is not an Exception.
    except BaseException as e:
        raise UserError(f"{path}: {what} ({first_line(e)})") from None


def read_json(path, expected: type = dict, what: str = "JSON"):
    """A JSON file whose top level is `expected` (an object, by default)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'is a directory, expected a file' if path.is_dir() else 'file not found'}")
    with reading(path, f"not valid {what}"):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, expected):
        raise UserError(f"{path}: expected a JSON {'object' if expected is dict else expected.__name__}, "
                        f"found {type(data).__name__}")
    return data
