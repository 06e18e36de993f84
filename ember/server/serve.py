"""`ember serve`: bind the address, load the engine, then serve the OpenAI API with uvicorn until
SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0-65535, got {port}")
    return port


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use or a host that is not this machine's
    is reported at once instead of after the load (uvicorn listens on it later)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: rebind while old connections linger
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(
            f"cannot listen on {host}:{port}: {e.strerror or e} (is another server using the port?)"
        ) from e
    return sock


def origin_list(text: str) -> list[str]:
    origins = [origin.strip().rstrip("/") for origin in text.split(",") if origin.strip()]
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin (scheme://host[:port], or '*')")
    if not origins:
        raise argparse.ArgumentTypeError("no origin given")
    return origins


# --reasoning-parser: whether replies are split into thinking and answer (None: when the template thinks)
REASONING_PARSERS = {"auto": None, "none": False, "deepseek_r1": True, "qwen3": True}
# --tool-call-parser: the tool-call formats of `ember.server.tools` (kept here: the CLI imports no server code)
TOOL_CALL_PARSERS = ("auto", "hermes", "qwen3_coder", "llama3_json", "mistral", "mistral_v11", "pythonic")
# sentence-transformers' pooling modes (1_Pooling/config.json) that Ember serves, as `--pooling` names them
SENTENCE_TRANSFORMERS_POOLING = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}


def add_pooling_arg(group: Any) -> None:
    group.add_argument(
        "--pooling",
        default="auto",
        choices=["auto", "last", "mean"],
        help="how /v1/embeddings pools a prompt's final hidden states: the last token's, or their mean; 'auto' "
        "(default) as the model's sentence-transformers config says (Qwen3-Embedding: last), else last",
    )


def add_tool_call_parser_arg(group: Any) -> None:
    group.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default="auto",
        help="how the model writes tool calls: 'hermes' (<tool_call> blocks of JSON: Qwen2.5, Qwen3, Hermes), "
        "'qwen3_coder' (<tool_call> blocks of <function=...> and <parameter=...>: Qwen3-Coder, Qwen3.5), "
        "'llama3_json' (a JSON object with 'name' and 'parameters': Llama 3.1-3.3), 'mistral' ([TOOL_CALLS] and a "
        "JSON array: Mistral-7B-v0.3, Nemo, Small 2409/2501; or, where the template speaks it, 'mistral_v11': "
        "[TOOL_CALLS]name[ARGS]{...} per call: Small 3.1+, Devstral, Magistral); 'pythonic' (a Python list of "
        'calls, [get_weather(city="Paris")]: Llama 3.2 and 4 with vLLM\'s pythonic templates, Gemma 3); '
        "'auto' (default) the one "
        "the chat template speaks, else Hermes with Ember's instructions in the system prompt",
    )


def add_trust_request_chat_template_arg(group: Any) -> None:
    group.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="use the Jinja template a chat request sends in 'chat_template' (vLLM's flag; off: such a request "
        "gets a 400). Templates run sandboxed, but one can loop for long: trust the clients first",
    )


def add_generation_config_arg(group: Any) -> None:
    group.add_argument(
        "--generation-config",
        choices=["auto", "vllm"],
        default="auto",
        help="'auto' (default, as vLLM): a request that leaves out temperature, top_p, top_k, min_p, "
        "repetition_penalty or max_tokens gets the value of the model's generation_config.json, if it sets one "
        "(Qwen3's temperature 0.6, ...; max_new_tokens for max_tokens); 'vllm': the API's own defaults "
        "(temperature 1, ...; chat replies run until the context ends, completions stop at 16 tokens)",
    )


def resolve_pooling(choice: str, model_dir: Path | None) -> str:
    """`--pooling`, with 'auto' read from a sentence-transformers directory's pooling module (else 'last')."""
    if choice != "auto":
        return choice
    if model_dir is None or not (model_dir / "modules.json").is_file():
        return "last"
    for module in json.loads((model_dir / "modules.json").read_text()):
        if module.get("type", "").endswith("Pooling"):
            config = json.loads((model_dir / module.get("path", "") / "config.json").read_text())
            modes = [name for name, on in config.items() if name.startswith("pooling_mode") and on]
            served = [SENTENCE_TRANSFORMERS_POOLING[m] for m in modes if m in SENTENCE_TRANSFORMERS_POOLING]
            if not served:
                raise ValueError(f"the model's pooling ({', '.join(modes)}) is not served: pass --pooling last|mean")
            return served[0]
    return "last"


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("EMBER_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $EMBER_API_KEY, or no key)",
    )
    g.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's)")
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE_OR_TEMPLATE",
        help="a Jinja chat template (a file, or the template itself) used instead of the model's, e.g. for a "
        "model that has none",
    )
    add_trust_request_chat_template_arg(g)
    g.add_argument(
        "--reasoning-parser",
        default="auto",
        choices=sorted(REASONING_PARSERS),
        help="split a reasoning model's <think> block from its answer, into 'reasoning' and 'reasoning_content': "
        "'auto' (default) when the chat template writes think blocks, 'none' never; vLLM's 'deepseek_r1' and "
        "'qwen3' name the same parser, always on",
    )
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted so that vLLM launch commands run: tool calling is always on",
    )
    add_tool_call_parser_arg(g)
    add_generation_config_arg(g)
    g.add_argument(
        "--allowed-origins",
        type=origin_list,
        default=None,
        metavar="ORIGINS",
        help="comma-separated browser origins that may call the API (CORS), e.g. 'https://app.example.com', or "
        "'*' for any (default: pages served from this machine, http://localhost:PORT and 127.0.0.1)",
    )
    add_pooling_arg(g)
    g.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="let API clients load and unload LoRA adapters (POST /v1/load_lora_adapter, /v1/unload_lora_adapter "
        "with a directory on this machine; vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING); implies --enable-lora",
    )
    g.add_argument(
        "--max-waiting",
        type=int,
        default=512,
        help="requests that may wait beyond --max-num-seqs before new ones get HTTP 429 (default 512)",
    )
    g.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="do not log the stats line (throughput, queue, KV cache, prefix-cache hits) every "
        "$EMBER_LOG_STATS_INTERVAL seconds (default 10) while requests run",
    )
    g.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="log a line for each finished request: its id (as the API returned it), why it ended, its tokens "
        "(prompt, cached, generated) and its time to first token and to the end",
    )
    g.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn log level (default warning; 'info' logs every request)",
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ember.cli import load_llm
    from ember.engine.async_engine import AsyncEngine, FinishedStats
    from ember.engine.heap import startup_objects_frozen
    from ember.server.app import OpenAIServer, build_app
    from ember.server.chat import load_chat_template
    from ember.server.metrics import EngineMetrics
    from ember.server.stats_log import StatsLogger, interval_from_environment, log_finished_request

    if args.model_path is not None:  # `ember serve MODEL`, as `vllm serve MODEL`
        if args.model is not None and args.model != args.model_path:
            raise ValueError(f"two models given: {args.model_path!r} and --model {args.model!r}")
        args.model = args.model_path
    started = time.monotonic()
    chat_template = load_chat_template(args.chat_template) if args.chat_template else None
    stats_interval = None if args.disable_log_stats else interval_from_environment()
    sock = bind_listening_socket(args.host, args.port)
    args.enable_lora = args.enable_lora or args.allow_runtime_lora_updating
    async_engine = AsyncEngine(lambda: load_llm(args).engine, args.max_waiting)
    engine = async_engine.engine
    name = args.served_model_name or engine.loaded.name
    if name in engine.lora_names:
        async_engine.shutdown()
        raise ValueError(f"the LoRA adapter {name!r} has the served model's name; name it otherwise")
    metrics = EngineMetrics(engine, name)
    async_engine.on_finished, async_engine.on_step = metrics.on_finished, metrics.on_step
    if args.enable_log_requests:

        def on_finished(stats: FinishedStats) -> None:
            metrics.on_finished(stats)
            log_finished_request(stats)

        async_engine.on_finished = on_finished
    reasoning = REASONING_PARSERS[args.reasoning_parser]
    server = OpenAIServer(
        async_engine,
        name,
        metrics,
        args.api_key,
        chat_template,
        args.allowed_origins,
        reasoning,
        runtime_lora=args.allow_runtime_lora_updating,
        tool_call_parser=args.tool_call_parser,
        generation_config=args.generation_config,
        pooling=resolve_pooling(args.pooling, engine.loaded.source_dir),
        trust_request_chat_template=args.trust_request_chat_template,
    )
    app = build_app(server)
    stats = None if stats_interval is None else StatsLogger(engine, metrics, stats_interval)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
        access_log=args.log_level in ("debug", "info"),
    )
    server = uvicorn.Server(config)
    url = f"http://{args.host}:{sock.getsockname()[1]}"  # --port 0: the port the system chose
    auth = f' -H "Authorization: Bearer {args.api_key}"' if args.api_key else ""
    original_startup = server.startup

    async def startup(sockets: Any = None) -> None:
        await original_startup(sockets)
        if server.started:
            if stats is not None:
                stats.start()
            print(
                f"Ember is serving {name} at {url}/v1 (ready in {time.monotonic() - started:.1f} s)\n"
                f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
                f'-d \'{{"messages": [{{"role": "user", "content": "Hello!"}}]}}\'',
                flush=True,
            )

    server.startup = startup  # type: ignore[method-assign]
    # uvicorn handles SIGINT/SIGTERM (stop accepting, let requests finish, then cancel), restores the
    # previous handlers and re-raises the signal; a no-op handler there makes a graceful stop exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        with startup_objects_frozen():
            server.run(sockets=[sock])
    finally:
        if stats is not None:
            stats.stop()
        async_engine.shutdown()
        sock.close()
    if not server.started:
        print(f"ember: error: could not start the server on {url}", file=sys.stderr)
        return 1
    return 0
