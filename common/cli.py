"""What every script shares at its edges: one-line errors with exit status 2, never a traceback."""
import logging
import sys
import warnings
from functools import wraps

# PEFT imports bitsandbytes, which warns on every CPU start about an optional kernel package it can do without.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# PEFT (0.21) still calls transformers' renamed gradient-checkpointing helpers; the warnings say nothing to a user.
warnings.filterwarnings("ignore", message=r".*(is_)?gradient_checkpointing.* is deprecated", category=FutureWarning)


class UserError(Exception):
    """A problem with the user's input. Printed as one line (or one block of lines) and exit status 2."""


def main_guard(fn):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
