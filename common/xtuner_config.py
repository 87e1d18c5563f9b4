"""An XTuner config's text (stored in its checkpoints' mmengine meta) -> the base model path and LoRA settings.
Parsed with `ast`, never executed: a config is Python, and running it would run whatever it holds."""
from __future__ import annotations

import ast

LORA_KEYWORDS = ("r", "lora_alpha", "lora_dropout", "bias", "target_modules", "use_dora", "use_rslora")


def xtuner_config_hints(text: str) -> tuple[str | None, dict]:
    """(pretrained_model_name_or_path, LoRA fields) from an XTuner config text. Parsed, never executed."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None, {}
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass

    def value(node):
        if isinstance(node, ast.Name):
            return constants.get(node.id)
        try:
            return ast.literal_eval(node)
        except ValueError:
            return None

    base, lora = constants.get("pretrained_model_name_or_path"), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "pretrained_model_name_or_path" and base is None:
            base = value(node.value)
        lora_call = _lora_call(node)
        if lora_call is not None:
            lora.update({kw.arg: value(kw.value) for kw in lora_call.keywords
                         if kw.arg in LORA_KEYWORDS and value(kw.value) is not None})
    return (base if isinstance(base, str) else None), lora


def _lora_call(node) -> ast.Call | None:
    """The `dict(...)` of `lora=dict(...)` (a keyword or a top-level assignment)."""
    if isinstance(node, ast.keyword) and node.arg == "lora":
        value = node.value
    elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "lora" for t in node.targets):
        value = node.value
    else:
        return None
    return value if isinstance(value, ast.Call) else None
