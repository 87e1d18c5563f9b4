"""A script run on a disk that fills up midway through its writes, for real: a process whose files may not grow past
`limit` bytes (RLIMIT_FSIZE), the signal that would kill it ignored, so the write that crosses it fails (EFBIG) as a
write to a full disk does (ENOSPC)."""
import resource
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_on_a_small_disk(script: str, *args, limit: int) -> subprocess.CompletedProcess:
    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, preexec_fn=small_disk)


def one_line_exit_2(proc: subprocess.CompletedProcess) -> bool:
    """The script ended as bad input does: exit status 2 and one line on stderr, no traceback."""
    return (proc.returncode == 2 and "Traceback" not in proc.stderr
            and len(proc.stderr.strip().splitlines()) == 1)
