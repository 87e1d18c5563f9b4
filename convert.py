"""Turn any checkpoint into a standard PEFT adapter directory (or an HF model, for full fine-tunes).

    python convert.py SRC [DST] [--base MODEL] [--verify] [--force]

SRC is one of:
  work_dirs/RUN/checkpoint-N/   our Trainer checkpoint (adapter + tokenizer + recipe; optimizer state is dropped)
  work_dirs/CFG/iter_N.pth      an XTuner (mmengine) checkpoint file
  work_dirs/CFG/iter_N.pth/     an XTuner DeepSpeed checkpoint directory (ZeRO-1/2/3 shards are merged)
  lora.pt | lora.bin | lora.safetensors   a plain state dict of LoRA weights (with --base)
DST defaults to SRC's sibling directory hf/.

Checkpoint pickles are loaded without running any code in them, and without mmengine, XTuner or DeepSpeed installed:
tensors, numpy arrays and known XTuner/DeepSpeed records only. A file asking for anything else is refused (exit 2)
and the refusal names what it asked for. --trust-checkpoint unpickles fully, for files you vouch for.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import artifacts, converting
from common.cli import UserError, main_guard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="checkpoint file or directory")
    p.add_argument("dst", type=Path, nargs="?", help="output directory (default: hf/ next to SRC)")
    p.add_argument("--base", help="base model (local dir or hub id) when it cannot be inferred, or moved")
    p.add_argument("--alpha", type=float, help="lora_alpha, when the checkpoint does not record it")
    p.add_argument("--verify", action="store_true", help="load the result onto the base with PEFT and run it")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="fully unpickle SRC: runs any code hidden in it. Only for files you trust")
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> None:
    args = parse_args(argv)
    dst = args.dst or converting.default_output(args.src)
    artifacts.check_output(dst, [args.src], args.force)  # before the (possibly long) load

    ckpt = converting.read_source(args.src, trust=args.trust_checkpoint)
    base = converting.choose_base(args.base, ckpt)
    if base is None and ckpt.is_adapter:  # a full model's own config.json is enough
        raise UserError(f"{args.src}: cannot tell which base model these weights belong to; pass --base DIR_OR_HUB_ID")
    notes = [] if base is None or converting.is_local(base) else [
        f"base `{base}` is not a local directory: recorded as is (a hub id?); pass --base DIR if it moved"]

    with artifacts.atomic_dir(dst) as tmp:
        if ckpt.is_adapter:
            config, n = converting.write_adapter(tmp, ckpt, base, args.alpha, notes)
            what = f"{n} adapter tensors (r={getattr(config, 'r', '?')}, alpha={getattr(config, 'lora_alpha', '?')})"
        else:
            n = converting.write_full_model(tmp, ckpt, base)
            what = f"{n} model tensors (full fine-tune)"
        tokenizer = converting.copy_tokenizer(tmp, ckpt, base, notes)
        converting.copy_recipe(tmp, ckpt)
        # Verified before the rename: a result that does not load never replaces anything.
        check = converting.verify(tmp, base, ckpt.is_adapter) if args.verify else None

    converting.warn(notes)
    print(f"converted {what} from {ckpt.kind} {args.src} -> {dst}; base: {base or 'n/a'}; "
          f"tokenizer: {tokenizer or 'not copied'}; recipe: {'copied' if ckpt.recipe else 'none'}")
    if check:
        print(check)


if __name__ == "__main__":
    main()
