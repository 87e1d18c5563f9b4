"""`chat.py --serve`: the model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn), one job a module:

    errors.py     ApiError: every error a client sees, in OpenAI's shape {"error": {"message", "type", "param", "code"}}
    body.py       the request body: read within a size limit (413, unread), then strict JSON (UTF-8, depth, surrogates)
    request.py    the OpenAI chat request -> ChatRequest, as plain functions (each bad field a 400 that names it)
    worker.py     the one thread that runs the model, batching requests (no web framework in it)
    responses.py  the OpenAI response bodies, whole and as server-sent events
    access.py     the API key, and the keyless server's Host / Origin / Content-Type checks
    transport.py  uvicorn's h11 protocol with a deadline for a request to arrive
    app.py        the FastAPI app (the API, and the web page's routes from common/webpage.py) and serve()

The endpoints:

    POST /v1/chat/completions   (stream: true for server-sent events)
    GET  /v1/models             the served model; an adapter run also lists its base, `ID:base` (the adapter off)
    GET  /health                {"status", "model", "running", "waiting", "cancelled"}
    GET  /                      the web page (common/webpage.py: chat, base vs tuned, the run)

Below: the defaults of chat.py's server flags, here so that its --help shows them without importing the server.
"""
HOST = "127.0.0.1"  # this machine only: serving further is a choice (--host), and a keyless one is warned about
PORT = 8000
MAX_BATCH = 8  # requests decoded together, one token each per forward
# A prompt longer than this, joining answers under way, is prefilled this many tokens per step: the others' answers
# pause for one chunk (~0.5 s on 2 cores, float32) rather than the whole prompt (a 1,700-token conversation: ~4 s),
# and chunks this long keep the prefill's products nearly as fast as one of the whole prompt
PREFILL_CHUNK = 256
# What the server and the REPL keep of the prompts they prefilled last (common.decoding.PromptCache): SmolLM2-135M in
# float32 holds 46 kB per position, a 7B model with grouped keys in bfloat16 ~57 kB: a few long conversations
PROMPT_CACHE_MB = 256
# An idle server that gets a request waits this long for another before it starts (and again after each that comes):
# requests that arrive together are prefilled in one forward, one pass over the weights, rather than the first alone
# and the rest behind it. Eight clients' next requests, sent as their answers end together, reach the worker over a
# few milliseconds (the event loop parses each); a lone request's first token comes this much later, and a batch
# starts at most --max-batch times this much later.
GATHER = 0.005
QUEUE_SIZE = 16  # requests that may wait beyond the batch; more get 429
MAX_REQUEST_BYTES = 1 << 20  # 1 MiB is far more text than a 32k-token context holds
READ_TIMEOUT = 30  # seconds a client has to send a whole request, headers and body
API_KEY_ENV = "SFT_API_KEY"  # the key from the environment: unlike --api-key, not shown by `ps` to other users
