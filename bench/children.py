"""Benchmark children: every measurement runs in a fresh process that writes its figures to a JSON file, so that
one path's imports, caches and memory peak do not leak into another's."""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    cmd: list[str]
    result_file: Path  # the child writes its figures here
    cwd: Path
    env: dict = field(default_factory=lambda: dict(os.environ))

    def start(self) -> Child:
        self.result_file.unlink(missing_ok=True)
        self.started = time.time()
        self.proc = subprocess.Popen([str(c) for c in self.cmd], cwd=self.cwd, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        return self

    def result(self) -> dict:
        """Waits for the child; its figures, and how long the whole process took."""
        _, stderr = self.proc.communicate()
        if self.proc.returncode != 0 or not self.result_file.is_file():
            raise RuntimeError(f"{' '.join(map(str, self.cmd[:3]))} exited {self.proc.returncode}: {stderr[-3000:]}")
        return {**json.loads(self.result_file.read_text()), "process_seconds": time.time() - self.started}


def results(children: list[Child], at_once: bool = False) -> list[dict]:
    """Each child's figures. Measurements run one after another (nothing else competes for the cores). A check that
    the children run (--quick) starts them all at once, one thread each: their imports take one core each, and
    children that each want every core slow each other far more than twice (OpenMP's idle threads spin)."""
    if not at_once:
        return [child.start().result() for child in children]
    for child in children:
        child.env = {**child.env, "OMP_NUM_THREADS": "1"}
        child.start()
    return [child.result() for child in children]
