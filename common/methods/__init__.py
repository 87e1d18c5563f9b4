"""The training methods (`train.method`), one module each, in one table: `table.METHODS`, name -> `Method` (spec.py).

A method module owns its name, its data (what a record is, the `data.format` values it reads, how its files are told
apart), the recipe keys it reads, its recipe checks, its `--dry-run` and `--dump-dataset`, its lines of the start-up
summary, its TRL trainer and its part of eval.py's report. train.py, eval.py and the recipe's method checks
(table.check_recipe) read these objects and compare no method names. `table.load_recipe` is the recipe loader with
the method checks.
This file holds no code: the method modules import their siblings (spec, pairwise), whose parent package this is.

    sft    conversations -> packed samples -> SFTTrainer                (sft.py; common.dataset, common.training)
    dpo    preference pairs -> pair rows -> DPOTrainer                 (dpo.py; pairwise.py, common.preference)
    orpo   preference pairs -> pair rows -> ORPOTrainer                (orpo.py; pairwise.py, common.preference)
    kto    rated answers (thumbs up/down) -> rows -> KTOTrainer         (kto.py; common.unpaired, common.preference)
    grpo   prompts -> completions scored by `rewards:` -> GRPOTrainer   (grpo.py; common.prompts, common.grpo, common.rewards)

How a new method is added (say `xyz`):
1. `common/methods/xyz.py` with `METHOD = Method(name="xyz", ...)` and the functions it names. Its module level
   imports only what the data needs (eval.py and the loaders import this table without training anything); TRL and
   the trainer are imported inside `build_trainer`. Nothing below the methods (common/recipe.py, training, data)
   imports a method module (tests/test_imports.py finds cycles, imports inside functions too). Reuse a data kind (its
   `kind`, `readers`, `load`, `claims`) or write one beside common/pairs.py.
2. Its recipe keys: a section of its own in common/recipe.py (a dataclass, its defaults the schema), listed in
   `METHOD.keys` ({"xyz": ("key", ...)}); anything else it requires goes in `METHOD.check`.
3. Add the module to METHODS in common/methods/table.py; tests (a sample per data.format in tests/test_methods.py
   SAMPLES, a short run, its loss against plain TRL's trainer on the same rows) and a section in docs/methods.md.
"""
