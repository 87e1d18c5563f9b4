"""The one table of training methods, name -> `Method`, and what reads it: the recipe's method checks
(`check_recipe`, through `load_recipe`), the held-out parts of eval.py's report, the loader of a data file's kind.
How a method is added: common/methods/__init__.py."""
from __future__ import annotations

import dataclasses

from common.cli import did_you_mean
from common.methods import dpo, grpo, kto, orpo, sft
from common.methods.spec import Method

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (sft, dpo, orpo, kto, grpo)}


def get(name: str) -> Method:
    return METHODS[name]  # load_recipe checked the name


def load_recipe(path, overrides=(), **options):
    """common.recipe.load_recipe with the recipe also checked against its train.method (check_recipe), every problem
    in one report: the recipe as train.py loads it. The recipe module imports no method (they sit above it: they
    build on its sections and the modules that read it)."""
    from common import recipe

    return recipe.load_recipe(path, overrides, check_method=check_recipe, **options)


def check_recipe(recipe, problems: list[str]) -> None:
    """The recipe against its method: the name, the data format, packing, the keys of method sections it does not
    read, and the method's own checks. Every problem is appended (common/recipe.py reports them all at once)."""
    name, d = recipe.train.method, recipe.data
    method = METHODS.get(name)
    if method is None:
        problems.append(f"`train.method`: unknown method `{name}` (one of: {', '.join(METHODS)})"
                        f"{did_you_mean(name, METHODS, cutoff=0.5)}")
        return
    formats = [("data.format", d.format)] + [(f"data.{key}[{i}].format", s.format)
                                            for key, sources in (("path", d.sources), ("eval_path", d.eval_sources))
                                            for i, s in enumerate(sources) if s.format is not None]
    for where, fmt in formats:  # data.format, and a mixture source's own
        if fmt != "auto" and fmt not in method.formats:
            problems.append(f"`{where}`: train.method {name} reads {method.kind} in the formats "
                            f"{', '.join(method.formats)} (or auto), not `{fmt}`")
    if d.pack and not method.packs:
        problems.append(f"`data.pack`: train.method {name} trains on {method.kind}, which are not packed; set "
                        "data.pack: false")
    for section in sorted({s for m in METHODS.values() for s in m.keys}):
        values = getattr(recipe, section)
        default = type(values)()
        for key in (f.name for f in dataclasses.fields(values)):
            if getattr(values, key) != getattr(default, key) and key not in method.keys.get(section, ()):
                users = [m.name for m in METHODS.values() if key in m.keys.get(section, ())]
                problems.append(f"`{section}.{key}` applies to train.method {' or '.join(users)}, not {name}")
    if recipe.rewards and not method.rewards:
        problems.append(f"`rewards` apply to train.method {' or '.join(m.name for m in METHODS.values() if m.rewards)}, "
                        f"not {name}")
    if method.check is not None:
        method.check(recipe, problems)


def held_out_parts() -> dict:
    """Each method's part of eval.py's report by its key, once (dpo and orpo share theirs)."""
    return {m.held_out.key: m.held_out for m in METHODS.values() if m.held_out is not None}


def loader_for(paths: list[str]):
    """The loader of the data kind the first file holds, told by its first record: a kind that claims it (preference
    pairs, rated answers), else conversations. eval.py takes any of them."""
    from pathlib import Path

    from common.formats import LoadReport, _records

    first = next(_records(Path(paths[0]), LoadReport()), (None, None))[1] if paths else None  # read no further
    return next((m.load for m in METHODS.values() if m.claims(first)), sft.METHOD.load)
