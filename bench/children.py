"""Benchmark children: every measurement runs in a fresh process that writes its figures to a JSON file, so that
one path's imports, caches and memory peak do not leak into another's. A check that the benches run (--quick, which
make test runs) runs each child's script in the bench's own process instead: its figures measure nothing anyway, and
each fresh process would import torch, transformers and peft again (~8 s of a core each)."""
from __future__ import annotations

import contextlib
import json
import os
import runpy
import subprocess
import sys
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

    @property
    def name(self) -> str:
        """What the child runs, for messages: its script, or the first argument after its `-c` code."""
        return str(self.cmd[3] if str(self.cmd[1]) == "-c" else self.cmd[1])

    def result(self) -> dict:
        """Waits for the child; its figures, and how long the whole process took."""
        _, stderr = self.proc.communicate()
        if self.proc.returncode != 0 or not self.result_file.is_file():
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {stderr[-3000:]}")
        return self._figures()

    def _figures(self) -> dict:
        return {**json.loads(self.result_file.read_text()), "process_seconds": time.time() - self.started}


    def run_here(self) -> dict:
        """The child's script (`python SCRIPT ARGS` or `python -c CODE ARGS`) run in this process as `__main__`, with
        the child's arguments, working directory and environment for the call (all put back after); its figures as
        `result` gives them. What it prints goes where the process's stdout goes for a child: nowhere."""
        self.result_file.unlink(missing_ok=True)
        self.started = time.time()
        script, *args = [str(c) for c in self.cmd[1:]]
        saved = sys.argv, list(sys.path), os.getcwd(), dict(os.environ)
        try:
            os.chdir(self.cwd)
            os.environ.update(self.env)
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                if script == "-c":
                    sys.argv = ["-c", *args[1:]]
                    exec(compile(args[0], "<child>", "exec"), {"__name__": "__main__"})
                else:
                    sys.argv = [script, *args]
                    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as python puts a script's folder
                    runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                raise RuntimeError(f"{self.name} exited {e.code}") from None
        finally:
            sys.argv, sys.path[:] = saved[0], saved[1]
            os.chdir(saved[2])
            os.environ.clear()
            os.environ.update(saved[3])
        if not self.result_file.is_file():
            raise RuntimeError(f"{self.name} wrote no {self.result_file}")
        return self._figures()


def results(children: list[Child], here: bool = False) -> list[dict]:
    """Each child's figures. Measurements run one after another, each in its own process (nothing else competes for
    the cores). `here` (--quick): each runs in this process instead, one after another (Child.run_here)."""
    if here:
        return [child.run_here() for child in children]
    return [child.start().result() for child in children]
