"""What a training method is to the rest of the suite: one `Method` object per method module (common/methods/), read
by the recipe checks (common.methods.check_recipe), train.py, eval.py and the data loaders. The method modules import
TRL and their trainers only inside the functions that build one: eval.py and the loaders import the table."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class HeldOut:
    """A method's part of eval.py's report, measured on the held-out records of its kind, base vs tuned."""
    key: str  # its entry in report.json ("preference", "kto")
    rows: Callable  # (records, tokenizer, template, data section) -> the rows it measures (other kinds ignored)
    measure: Callable  # (model, rows) -> dict
    compare: Callable  # (base dict, tuned dict) -> the result report.json holds
    markdown: Callable  # (result) -> report.md lines
    summary: Callable  # (result) -> the line eval.py prints


@dataclass(frozen=True)
class Method:
    name: str  # the `train.method` value
    # Its data: what a record is (for messages), the `data.format` readers (name -> record reader), the loader of files
    # of that kind, and whether a file whose first record this is holds that kind (eval.py, the web page's ratings).
    kind: str
    readers: dict
    load: Callable  # (paths, fmt, on_bad_record, report) -> records
    claims: Callable  # (record) -> bool
    build_datasets: Callable  # (recipe, tokenizer) -> train rows, eval rows, stats
    print_dry_run: Callable  # (recipe, tokenizer, train rows, stats)
    dump_dataset: Callable  # (train rows, path)
    summary_lines: Callable  # (recipe, stats) -> the data lines of the start-up summary
    # (recipe, model, fast_paths, tokenizer, train rows, eval rows, callbacks, dtype, disable_tqdm) -> the trainer
    build_trainer: Callable
    # The keys it reads of the recipe sections that methods own or share (`preference`, `kto`): a key set away from its
    # default that the recipe's method does not read is a recipe problem, not a silent no-op.
    keys: dict = field(default_factory=dict)
    packs: bool = False  # data.pack applies (conversations pack into rows; pairs and rated answers do not)
    check: Optional[Callable] = None  # (recipe, problems): what else the method needs of a recipe
    rewards: bool = False  # learns from the recipe's `rewards:` (common/rewards.py)
    held_out: Optional[HeldOut] = None

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.readers)
