"""Merge a LoRA adapter into its base model, shard by shard: a standalone HF model that any tool can load.

    python merge.py                                   # latest run: RUN/final -> RUN/merged
    python merge.py work_dirs/demo/final              # base from adapter_config.json; output work_dirs/demo/merged
    python merge.py BASE ADAPTER OUT --max-shard-size 2GB --dtype bf16 --verify
    python merge.py --gguf q8_0 --verify              # also OUT/model-q8_0.gguf + an Ollama Modelfile, proved
    python merge.py work_dirs/demo/merged --gguf f16  # a model merged earlier (or a full fine-tune): GGUF only

Memory stays near one output shard plus the adapter (XTuner's `convert merge` loads the whole model); the GGUF
export streams tensor by tensor too.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

from common import artifacts, gguf_export, merging, ollama
from common.cli import UserError, main_guard
from common.precision import CHOICES, DTYPES, canonical
from common.weights import ModelWeights


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="PATH", help="BASE ADAPTER OUT, or ADAPTER, or nothing (latest run)")
    p.add_argument("--max-shard-size", default="2GB", help="per output shard: 2GB, 500MB or bytes (default 2GB)")
    p.add_argument("--dtype", default="auto", choices=CHOICES,
                   help="dtype the merged weights are stored in (the merge itself runs in float32); auto: the base's")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where B @ A is computed")
    p.add_argument("--gguf", choices=gguf_export.TYPES, help="also write OUT/model-TYPE.gguf (llama, qwen2) and an "
                   "Ollama Modelfile, from the training template; k-quants (Q4_K_M...): llama-quantize on the f16 "
                   "file (docs/export.md#k-quants)")
    p.add_argument("--verify", action="store_true", help="compare logits with PEFT's base + adapter (loads both, float64); "
                   "with --gguf, also load the GGUF back and compare it with the merged model")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    return p.parse_args(argv)


def resolve_paths(paths: list[str]) -> tuple[str | None, Path, Path]:
    """(base or None = from adapter_config.json, adapter dir, output dir)."""
    if not paths:
        run = artifacts.latest_run()
        return None, run / artifacts.FINAL_DIR, run / artifacts.MERGED_DIR
    if len(paths) == 1:
        adapter = Path(paths[0]).resolve()  # resolved, so `merge.py .` has a name to derive OUT from
        # final/ of a run merges into the run's merged/; any other adapter dir into a sibling ADAPTER-merged/
        out = adapter.parent / artifacts.MERGED_DIR if adapter.name == artifacts.FINAL_DIR else adapter.with_name(adapter.name + "-merged")
        return None, adapter, out
    if len(paths) == 3:
        return paths[0], Path(paths[1]), Path(paths[2])
    raise UserError(f"expected BASE ADAPTER OUT, ADAPTER, or no path (latest run); got {len(paths)} paths")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    return device


def print_verify(report: dict, out: Path) -> bool:
    if report["written_dtype"]:
        print(f"verify: written {report['written_dtype']} model vs PEFT: max |logit diff| "
              f"{report['max_abs_diff_written']:.3g} (rounding to {report['written_dtype']})")
    print(f"verify: fp32 merge vs PEFT base + adapter on {report['prompts']} prompts (float64 logits): max |logit diff| "
          f"{report['max_abs_diff']:.3g} (limit {report['tolerance']:g}); vs the base model: {report['max_abs_diff_vs_base']:.3g}")
    if not report["ok"]:
        why = ("differs from PEFT's adapter model" if report["max_abs_diff"] > report["tolerance"]
               else "is the base model: the adapter changes nothing (untrained, lora_B all zero?)")
        print(f"verify FAILED: the merged model {why}; nothing written to {out}", file=sys.stderr)
    else:
        print("verify: OK")
    return report["ok"]


def ship_gguf(model_dir: Path, out: Path, qtype: str, recipe, verify: bool) -> bool:
    """The GGUF + Modelfile in model_dir (which becomes OUT), with the model's settings (artifacts.model_settings);
    with verify, loaded back and checked."""
    start = time.time()
    path, modelfile, why = gguf_export.ship(model_dir, qtype, recipe, out.resolve().parent.name)
    print(f"GGUF: {out / path.name} ({path.stat().st_size / 1e6:.1f} MB) in {time.time() - start:.1f}s, "
          f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"Modelfile: {out / modelfile.name} (ollama create NAME -f {out / modelfile.name})" if modelfile
          else f"note: no Modelfile: {why}")
    if not verify:
        return True
    r = gguf_export.verify(model_dir, path, qtype, recipe)
    if "greedy_token_agreement" in r:
        print(f"verify: GGUF {qtype} vs the merged model, greedy answers to the evaluation prompts: the GGUF picks the "
              f"same token at {100 * r['greedy_token_agreement']:.1f}% of {r['tokens']} positions "
              f"(limit {100 * r['agreement_limit']:.0f}%)")
    rounded = f" rounded to {qtype} (what the file stores)" if qtype != "f32" else ""
    print(f"verify: GGUF {qtype} vs the merged model{rounded}: max |logit diff| {r['max_abs_diff']:.3g} "
          f"(limit {r['limit']:g}); vs float32: {r['max_abs_diff_vs_float32']:.3g}")
    print(f"verify: the GGUF's chat template gives the training token ids: {'yes' if r['chat_template_ids_equal'] else 'NO'}"
          + (f"; the Modelfile's TEMPLATE too: {'yes' if r['modelfile_ids_equal'] else 'NO'}" if "modelfile_ids_equal" in r else ""))
    print("verify: OK" if r["ok"] else f"verify FAILED: the GGUF does not match; nothing written to {out}", file=sys.stdout if r["ok"] else sys.stderr)
    return r["ok"]


@main_guard
def main(argv=None):
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the report is the merge's own lines
    base_arg, adapter_dir, out = resolve_paths(args.paths)
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: adapter directory not found")
    if artifacts.is_full_model(adapter_dir):  # a full fine-tune: merging is idempotent, not an error
        if args.gguf:  # export the model in place: its GGUF and Modelfile appear beside its shards
            artifacts.check_output(gguf_export.gguf_path(adapter_dir, args.gguf), [], args.force)
            modelfile = adapter_dir / artifacts.MODELFILE  # ours is regenerated for the newest GGUF; one edited by hand is kept
            if modelfile.is_file() and not modelfile.read_text(encoding="utf-8").startswith(ollama.HEADER):
                artifacts.check_output(modelfile, [], args.force)
            settings = artifacts.model_settings(adapter_dir)
            return 0 if ship_gguf(adapter_dir, adapter_dir, args.gguf, settings, args.verify) else 1
        print(f"{adapter_dir} is already a full model ({artifacts.MODEL_CONFIG} + weights, no {artifacts.ADAPTER_CONFIG}): "
              f"nothing to merge; load it directly, e.g. python chat.py {adapter_dir}")
        return 0
    if not artifacts.is_adapter(adapter_dir):
        raise UserError(f"{adapter_dir}: not a PEFT adapter directory (no {artifacts.ADAPTER_CONFIG}) and not a model")
    max_shard_size = merging.parse_size(args.max_shard_size)
    device = resolve_device(args.device)
    base_dir = artifacts.resolve_base(base_arg or artifacts.adapter_base(adapter_dir))
    if not (base_dir / artifacts.MODEL_CONFIG).is_file():
        raise UserError(f"{base_dir}: no {artifacts.MODEL_CONFIG}; BASE must be a Hugging Face model directory")
    artifacts.check_output(out, [adapter_dir, base_dir], args.force)

    settings = artifacts.model_settings(base_dir, adapter_dir)
    if settings.model.quantization:
        print(f"note: this adapter was trained on a {settings.model.quantization} quantized base (QLoRA); it is merged "
              f"into the full-precision base {base_dir}, as QLoRA intends, so outputs can differ slightly from training's")
    adapter = merging.load_adapter(adapter_dir)
    base = ModelWeights(base_dir)
    plan = merging.plan_merge(base, adapter, merging.tied_weights(base_dir), DTYPES.get(canonical(args.dtype)), device)
    print(f"merging {adapter_dir} ({len(adapter.loras)} LoRA layers, {len(adapter.tensors)} saved tensors) "
          f"into {base_dir} ({len(base.files)} file(s), {len(base.shape)} tensors) -> {out}")
    if plan.untied:
        pairs = ", ".join(f"{t} = {s}" for t, s in plan.untied.items())
        print(f"note: the adapter changes the tied weights {pairs} apart (PEFT wraps each module on its own), so the "
              f"merge unties them: both are written and tie_word_embeddings is set to false in {artifacts.MODEL_CONFIG}")
    elif plan.skipped_tied:
        print(f"tied weights stay tied: {', '.join(plan.skipped_tied)} is not written (transformers re-ties it on load)")

    with artifacts.atomic_dir(out) as tmp:  # a failed or interrupted merge leaves OUT as it was
        start = time.time()
        shards = merging.write_shards(plan, tmp, max_shard_size)
        seconds = time.time() - start
        print(merging.write_side_files(plan, tmp))
        for name, size in shards:
            print(f"  {name}  {size / 1e6:9.1f} MB")
        print(f"{len(shards)} shard(s), {sum(s for _, s in shards) / 1e6:.1f} MB (limit {max_shard_size / 1e6:.1f} MB per shard), "
              f"merged in {seconds:.1f}s, process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        if args.verify and not print_verify(merging.verify(plan, tmp, device), out):
            raise SystemExit(1)
        if args.gguf and not ship_gguf(tmp, out, args.gguf, settings, args.verify):
            raise SystemExit(1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
