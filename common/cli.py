"""What every script shares at its edges: one-line errors with exit status 2, never a traceback."""
import sys
from functools import wraps


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
