"""Chat with a fine-tuned model in the prompt format it was trained with.

    python chat.py                                    # latest run: RUN/merged, else RUN/final on its base
    python chat.py work_dirs/demo/merged              # a merged (or any Hugging Face) model
    python chat.py models/Qwen1.5-1.8B-Chat --adapter work_dirs/psych_qwen/final --prompt-template qwen_chat
    python chat.py --once "你好"                      # answer one question and exit
    python chat.py --serve --port 8000                # an OpenAI-compatible API at http://127.0.0.1:8000/v1, and
                                                      # a web page at http://127.0.0.1:8000/ (chat, compare, run)
    python chat.py work_dirs/demo/final --serve       # an adapter: its base is served too, as the model `demo:base`
    printf '你好\\n我最近很焦虑\\n' | python chat.py    # piped: one user turn per line, plain answers

In the REPL: end a line with \\ to continue it on the next; /reset (RESET) clears the history, /system TEXT sets the
system prompt, /exit (EXIT) or Ctrl-D leaves; Ctrl-C stops the current answer.
"""
import argparse
import sys

from common.artifacts import MAX_LENGTH_CAP
from common.cli import main_guard
from common.precision import CHOICES, canonical
from common.server import (API_KEY_ENV, HOST, MAX_BATCH, MAX_REQUEST_BYTES, PORT, PREFILL_CHUNK, PROMPT_CACHE_MB,
                           QUEUE_SIZE, READ_TIMEOUT)
from common.templates import NAMES, SYSTEM_TEMPLATES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model, adapter or run directory (default: the latest run)")
    p.add_argument("--adapter", help="PEFT adapter directory to load on MODEL")
    p.add_argument("--prompt-template", metavar="NAME", help=f"one of: {', '.join(NAMES)} "
                   "(default: the run's data.template, else `tokenizer`)")
    p.add_argument("--system", help="system prompt (default: the run's data.system; '' for none)")
    p.add_argument("--system-template", metavar="NAME", help="a system prompt from XTuner's SYSTEM_TEMPLATE table: "
                   + ", ".join(SYSTEM_TEMPLATES))
    p.add_argument("--bot-name", default="BOT", help="fills {bot_name} in --system-template (default BOT)")
    p.add_argument("--bits", type=int, choices=[4, 8], help="load the model quantized (bitsandbytes)")
    p.add_argument("--torch-dtype", default="auto", choices=CHOICES,
                   help="auto: bfloat16 where the GPU or CPU has it natively, else float16 on a GPU, float32 on a CPU")
    p.add_argument("--max-length", type=int, help="context (prompt + answer) in tokens; default: the run's "
                   f"data.max_length, else the model's max_position_embeddings capped at {MAX_LENGTH_CAP}. "
                   "Older turns are dropped to fit")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's evaluation.max_new_tokens (256)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the run's evaluation.temperature, 0.1)")
    p.add_argument("--top-k", type=int, help="default: the run's evaluation.top_k (40)")
    p.add_argument("--top-p", type=float, help="default: the run's evaluation.top_p (0.75)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="make sampling reproducible")
    p.add_argument("--stop-words", nargs="+", default=[], metavar="WORD", help="extra stop words (the template's "
                   "and EOS always apply)")
    p.add_argument("--no-stream", action="store_true", help="print each answer whole instead of token by token")
    p.add_argument("--once", metavar="QUESTION", help="answer QUESTION and exit")
    p.add_argument("--prompt-cache", type=float, default=PROMPT_CACHE_MB, metavar="MB", help="keep the prompts "
                   "prefilled last, up to MB, so that the next turn of a conversation (or a prompt with the same "
                   "system prompt) prefills only what is new (default %(default)s; 0: off)")
    p.add_argument("--eager", action="store_true", help="decode without the compiled decode step: neither use nor "
                   "build one (docs/decoding.md#the-compiled-decode-step; $DECODE_STEP_CACHE=off does the same "
                   "everywhere)")
    serving = p.add_argument_group("API server (--serve)")
    serving.add_argument("--serve", action="store_true", help="serve the model as an OpenAI-compatible API "
                         "(/v1/chat/completions, /v1/models, /health) and a web page at / (chat, base vs tuned, the "
                         "run). An adapter (RUN/final, or --adapter) also serves its base, adapter off, as the model "
                         "ID:base (ID: the run's name)")
    serving.add_argument("--host", default=HOST, help="address to listen on (default %(default)s: this machine)")
    serving.add_argument("--port", type=int, default=PORT, help="(default %(default)s)")
    serving.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on /v1 (visible to "
                         f"other users in `ps`: prefer --api-key-file or ${API_KEY_ENV})")
    serving.add_argument("--api-key-file", metavar="PATH", help=f"the key, on one line of a file (else ${API_KEY_ENV}; "
                         "without a key, only requests from this machine's own pages and tools are answered)")
    serving.add_argument("--max-batch", type=int, default=MAX_BATCH, metavar="N", help="requests answered together, "
                         "one token each per step of the model (default %(default)s; 1: one at a time)")
    serving.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N", help="a longer prompt "
                         "that joins answers under way is prefilled N tokens per step, so that they go on meanwhile "
                         "(default %(default)s; 0: each prompt whole as it joins)")
    serving.add_argument("--queue-size", type=int, default=QUEUE_SIZE, metavar="N", help="requests that may wait "
                         "while --max-batch are answered; more get 429 (default %(default)s)")
    serving.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES, metavar="N", help="larger "
                         "request bodies get 413 before they are read (default %(default)s: 1 MiB)")
    serving.add_argument("--read-timeout", type=float, default=READ_TIMEOUT, metavar="SECONDS", help="a client that "
                         "has not sent its whole request (headers and body) by then is disconnected "
                         "(default %(default)s)")
    args = p.parse_args(argv)
    if args.system is not None and args.system_template:
        p.error("give --system or --system-template, not both")
    if args.serve and args.once is not None:
        p.error("give --serve or --once, not both")
    if args.queue_size < 1:
        p.error("--queue-size must be at least 1")
    if args.max_batch < 1:
        p.error("--max-batch must be at least 1")
    if args.prefill_chunk < 0:
        p.error("--prefill-chunk must be 0 (off) or more")
    if not 0 <= args.prompt_cache < float("inf"):
        p.error("--prompt-cache must be 0 (off) or a number of megabytes")
    if args.max_request_bytes < 1:
        p.error("--max-request-bytes must be at least 1")
    if args.api_key == "":
        p.error("--api-key is empty (leave it out to serve without a key)")
    if args.api_key is not None and args.api_key_file is not None:
        p.error("give --api-key or --api-key-file, not both")
    if not args.read_timeout > 0:
        p.error("--read-timeout must be more than 0")
    args.torch_dtype = canonical(args.torch_dtype)
    return args


def chat_settings(args, source):
    """(template, system prompt, Sampling, context length): the flags, else the model's settings (its run's recipe,
    or the schema's defaults: artifacts.model_settings)."""
    from common.generation import Sampling
    from common.templates import get_template, system_from_template

    recipe = source.recipe
    template = get_template(args.prompt_template or recipe.data.template, recipe.data.thinking)
    if args.system_template:
        system = system_from_template(args.system_template, args.bot_name)
    else:
        # Not evaluation.system: a prompt the model never trained under can pull a small model off course.
        system = args.system if args.system is not None else recipe.data.system
    sampling = Sampling.from_evaluation(recipe.evaluation, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        seed=args.seed, repetition_penalty=args.repetition_penalty)
    return template, system or None, sampling, args.max_length or recipe.data.max_length


@main_guard
def main(argv=None, stdin=None):
    """stdin: where messages come from (default: sys.stdin; a terminal gets the interactive REPL)."""
    args = parse_args(argv)
    stdin = stdin if stdin is not None else sys.stdin
    from common import artifacts, repl
    from common.decode_step import FastStep
    from common.generation import Generator
    from common.modeling import load_for_generation

    if args.serve:
        from common.server.access import api_key_from

        api_key = api_key_from(args.api_key, args.api_key_file)  # a bad key file fails before the model loads
    source = artifacts.resolve_model(args.model, args.adapter)
    template, system, sampling, max_length = chat_settings(args, source)  # an unknown name fails before the load
    model, tokenizer = load_for_generation(source, args.torch_dtype, args.bits)
    # The compiled decode step where one applies; built in the background for the REPL and the server, which answer
    # many times, not for --once, which a build would not pay back.
    fast = None if args.eager else FastStep.for_model(model, build=args.once is None)
    generator = Generator(model, tokenizer, template, max_length, args.stop_words, fast, args.prompt_cache)
    if system and not template.has_system:
        print(f"note: template `{template.name}` has no system slot: the system prompt is not used", file=sys.stderr)
    session = repl.ChatSession(generator, sampling, system)  # checks the settings fit the context (--serve too)
    if args.serve:
        from common.server.app import serve

        return serve(generator, sampling, system, source, args.host, args.port, api_key, args.queue_size,
                     args.max_request_bytes, args.read_timeout, args.max_batch, args.prefill_chunk)
    if args.once is not None:
        console = repl.Console(interactive=False, stream=not args.no_stream)
        return repl.converse(session, console, [("--once", args.once)])
    console = repl.Console(interactive=stdin.isatty(), stream=not args.no_stream, lines=stdin)
    if console.interactive:
        import readline  # noqa: F401  (line editing and history for input())

        console.note(f"{source.name} | template {template.name} | context {generator.max_length} tokens | "
                     r"end a line with \ to continue | /reset /system TEXT /exit | Ctrl-C stops an answer, Ctrl-D exits")
    repl.converse(session, console, repl.repl_messages(console))


if __name__ == "__main__":
    main()
