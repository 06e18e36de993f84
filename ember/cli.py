"""The `ember` command line: generate, chat, serve and bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.engine.sampling_params import SamplingParams
from ember.engine.structured_output import StructuredOutputs, check_constraint


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="a .gguf file or a Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="'dummy': random weights of the model's architecture (--model is then a preset or config dir)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights, activations and KV-cache dtype (default auto: bfloat16 on CUDA and on CPUs with "
        "AVX512-BF16 or AMX, else float32)",
    )
    g.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto: cuda when a GPU is seen"
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="CUDA: the fraction of GPU memory Ember may fill, weights and KV cache together (default 0.9)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="CUDA: run decode steps eagerly instead of replaying the CUDA graphs captured at start-up",
    )
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA: schedule and launch each decode step while the one before still runs on the GPU, so the "
        "host's work overlaps the GPU's (a request ending on a stop token costs one wasted row; requests with a "
        "predicted output run plain steps). Default: on wherever decode steps replay CUDA graphs and no "
        "--speculative method is set (+12-18%% output tok/s on an H200); --no-async-scheduling turns it off",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=float,
        default=os.environ.get("EMBER_KV_CACHE_MEMORY"),  # a string default goes through `type` too
        metavar="GIB",
        help="KV-cache size in GiB (default: $EMBER_KV_CACHE_MEMORY, else a quarter of free memory, at most 4 GiB; "
        "generate and chat keep one context at most)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "fp8_e4m3"],
        help="KV-cache element type. auto: the model's dtype. fp8 (= fp8_e4m3): float8 e4m3, unscaled (values past "
        "+-448 saturate; vLLM's fp8 without calibrated scales): half of bf16's bytes, so twice the tokens fit and "
        "decode attention reads half as much, at some accuracy. CUDA only (Ember's Triton kernels)",
    )
    g.add_argument(
        "--max-num-seqs", type=int, help="most requests running at once (default 128 on the CPU, 256 on CUDA)"
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="token budget of one engine step; longer prompts are prefilled in chunks (default 1024 on the "
        "CPU, 2048 on CUDA)",
    )
    g.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the model's)")
    g.add_argument(
        "--scheduling-policy",
        default="fcfs",
        choices=["fcfs", "priority"],  # config.SCHEDULING_POLICIES (the CLI imports no torch)
        help="'fcfs' (default): requests run in their order of arrival; 'priority': by each request's "
        "'priority' field, lower first, ties by arrival; a waiting request preempts less important running ones "
        "when it cannot start otherwise",
    )
    g.add_argument("--seed", type=int, default=0, help="global seed for unseeded sampling (default 0)")
    g.add_argument(
        "--speculative",
        default=None,
        metavar="METHOD",
        help="speculative decoding: 'ngram' (prompt lookup), 'suffix' (suffix index over all recent requests) "
        "or 'draft:<model>' (a smaller model with the same tokenizer); outputs are unchanged (default off; a "
        "request's predicted output drafts without it)",
    )
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=5,
        help="most tokens drafted per step and request (default 5; at least 8 from a predicted output)",
    )
    g.add_argument(
        "--speculative-config",
        type=speculative_config,
        default=None,
        metavar="JSON",
        help='vLLM\'s form of the speculative options, instead of --speculative: {"method": "ngram" | '
        '"suffix" | "draft_model", "model": ..., "num_speculative_tokens": N, '
        '"prompt_lookup_max": N, "prompt_lookup_min": N}',
    )
    g.add_argument(
        "--speculative-max-batch-size",
        type=int,
        default=8,
        help="speculate only in steps with at most this many running requests, where decode is memory-bound "
        "(default 8)",
    )
    g.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="turn off automatic prefix caching (reuse of the KV blocks of earlier identical prefixes)",
    )
    g = parser.add_argument_group("LoRA adapters")
    g.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters beside the base model, mixed in the same batches (implied by --lora-modules)",
    )
    g.add_argument(
        "--lora-modules",
        type=lora_module,
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=PATH",
        help="PEFT adapter directories to load at start-up, each served as a model named NAME (vLLM's form; "
        '\'{"name": ..., "path": ...}\' also works)',
    )
    g.add_argument(
        "--max-lora-rank", type=int, default=None, help="refuse adapters of a higher rank (default: any rank)"
    )
    g.add_argument(
        "--max-loras",
        type=int,
        default=None,
        help="distinct adapters running at once; a request of one more waits while others run (default: any)",
    )


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most (default {max_tokens})"
    )
    g.add_argument(
        "--min-tokens", type=int, default=0, help="tokens to generate before a stop token or string may end the text"
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 (or below 1e-5) = greedy (default 0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="in [0.01, 100]; 1 = none (default)")
    g.add_argument("--sample-seed", type=int, default=None, help="per-request seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g = parser.add_argument_group("structured output (at most one)")
    g.add_argument("--json-schema", metavar="SCHEMA", help="output valid under this JSON schema (a file or JSON text)")
    g.add_argument("--json-object", action="store_true", help="output one JSON object")
    g.add_argument("--regex", help="output matching this regular expression")
    g.add_argument("--choice", action="append", help="output exactly one of these strings (repeatable)")
    g.add_argument("--grammar", metavar="EBNF", help="output of this EBNF grammar, root rule `root` (a file or text)")


def text_or_file(value: str) -> str:
    """An option's value, or the content of the file it names."""
    path = Path(value)
    return path.read_text() if len(value) < 4096 and path.is_file() else value


def structured_outputs(args: argparse.Namespace) -> StructuredOutputs | None:
    schema = None
    if args.json_schema is not None:
        try:
            schema = json.loads(text_or_file(args.json_schema))
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema is neither a file nor valid JSON ({e})") from e
    grammar = text_or_file(args.grammar) if args.grammar is not None else None
    given = (schema, args.json_object or None, args.regex, args.choice, grammar)
    if sum(value is not None for value in given) > 1:
        raise ValueError("give at most one of --json-schema, --json-object, --regex, --choice and --grammar")
    if all(value is None for value in given):
        return None
    spec = StructuredOutputs(
        json=schema, json_object=args.json_object, regex=args.regex, choice=args.choice, grammar=grammar
    )
    check_constraint(spec)  # before the model loads: a typo is an error at once
    return spec


SPECULATIVE_CONFIG_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")


def speculative_config(text: str) -> dict[str, Any]:
    """`--speculative-config`, vLLM's JSON form of the speculative options, as the engine's keyword arguments."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    unknown = sorted(set(config) - set(SPECULATIVE_CONFIG_KEYS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown)}: not served (Ember takes {', '.join(SPECULATIVE_CONFIG_KEYS)})"
        )
    method = config.get("method") or ("draft_model" if config.get("model") else None)
    if method in ("ngram", "suffix"):
        kwargs: dict[str, Any] = {"speculative": method}
    elif method == "draft_model" and isinstance(config.get("model"), str):
        kwargs = {"speculative": f"draft:{config['model']}"}
    else:
        raise argparse.ArgumentTypeError(f"method must be ngram, suffix or draft_model (with a model), got {method!r}")
    for key in SPECULATIVE_CONFIG_KEYS[2:]:
        if key in config:
            if not isinstance(config[key], int) or config[key] < 1:
                raise argparse.ArgumentTypeError(f"{key} must be a positive integer, got {config[key]!r}")
            kwargs[key] = config[key]
    return kwargs


def lora_module(text: str) -> tuple[str, str]:
    """One `--lora-modules` entry: NAME=PATH, or vLLM's JSON object with "name" and "path"."""
    if text.lstrip().startswith("{"):
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("name"), str)
            or not isinstance(entry.get("path"), str)
        ):
            raise argparse.ArgumentTypeError('a JSON entry needs "name" and "path" strings')
        return entry["name"], entry["path"]
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def speculative_method(args: argparse.Namespace) -> str | None:
    """The speculative method, from --speculative or --speculative-config."""
    return args.speculative or (args.speculative_config or {}).get("speculative")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "load_format": args.load_format,
        "dtype": args.dtype,
        "device": args.device,
        "seed": args.seed,
        "block_size": args.block_size,
        "kv_cache_dtype": args.kv_cache_dtype,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": not args.no_prefix_caching,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_model_len": args.max_model_len,
        "scheduling_policy": args.scheduling_policy,
        "speculative": args.speculative,
        "num_speculative_tokens": args.num_speculative_tokens,
        "speculative_max_batch_size": args.speculative_max_batch_size,
        "enforce_eager": args.enforce_eager,
        "async_scheduling": args.async_scheduling,
        "enable_lora": args.enable_lora,
        "max_lora_rank": args.max_lora_rank,
        "max_loras": args.max_loras,
    }
    if args.lora_modules:
        names = [name for name, _ in args.lora_modules]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"--lora-modules names {', '.join(repeated)} more than once")
        kwargs["lora_modules"] = dict(args.lora_modules)
    if args.speculative_config is not None:
        if args.speculative is not None:
            raise ValueError("give --speculative or --speculative-config, not both")
        kwargs |= args.speculative_config
    if args.kv_cache_memory is not None:
        if args.kv_cache_memory <= 0:
            raise ValueError(f"--kv-cache-memory must be a positive number of GiB, got {args.kv_cache_memory}")
        kwargs["kv_cache_memory"] = int(args.kv_cache_memory * (1 << 30))
    return kwargs


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sample_seed,
        stop=args.stop,
        structured_outputs=structured_outputs(args),
    )


def load_llm(args: argparse.Namespace, one_sequence: bool = False) -> Any:
    """Load the model behind a spinner, so a multi-second load never looks like a hang. `one_sequence`: a
    command that runs one sequence at a time (generate, chat) gets a KV cache of one context, not the server's."""
    from rich.console import Console

    from ember.engine.engine import LLM

    kwargs = engine_kwargs(args) | ({"max_sequences": 1} if one_sequence else {})
    with Console(stderr=True).status(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} ..."):
        return LLM(args.model, **kwargs)


GENERATE_ADAPTER = "--lora"  # the name `ember generate --lora PATH` loads its adapter under


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    if not args.prompt:
        raise ValueError("the prompt is empty")
    if args.lora is not None:
        args.lora_modules.append((GENERATE_ADAPTER, args.lora))
    llm = load_llm(args, one_sequence=True)
    for delta in llm.stream(args.prompt, params, lora=None if args.lora is None else GENERATE_ADAPTER):
        for out in delta.outputs:
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ember.server.chat import load_chat_template

    params = sampling_params(args)
    template = load_chat_template(args.chat_template) if args.chat_template else None
    llm = load_llm(args, one_sequence=True)
    template = template or getattr(llm.tokenizer, "chat_template", None)
    if llm.tokenizer is None or not template:
        raise ValueError("this model has no chat template: pass --chat-template, or use `ember generate`")
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chatting with the model. Type /exit or press Ctrl-D to leave, /reset to start over.", file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if user == "/exit":
            return 0
        if user == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        prompt = llm.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        ids = llm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply = []
        sys.stdout.write("model> ")
        for delta in llm.stream(ids, params):
            for out in delta.outputs:
                reply.append(out.text)
                sys.stdout.write(out.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from ember.bench.baselines import BASELINES
    from ember.bench.throughput import bench_throughput
    from ember.bench.workloads import check_workload_spec

    unknown = [b for b in args.baseline.split(",") if b and b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    check_workload_spec(args.workload)  # before the model loads
    bench_throughput(args)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from ember.bench.serving import bench_serve

    bench_serve(args)
    return 0


def cmd_bench_agentic(args: argparse.Namespace) -> int:
    from ember.bench.agentic import bench_agentic

    bench_agentic(args)
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from ember.bench.latency import bench_latency

    bench_latency(args)
    return 0


def cmd_bench_lora(args: argparse.Namespace) -> int:
    from ember.bench.lora import bench_lora

    bench_lora(args)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import tempfile

    from ember.agents.cli import check_agent_args, run_agent, skills_from_args
    from ember.server.launch import running_server

    check_agent_args(args)
    skills = skills_from_args(args)
    if args.url:
        return asyncio.run(run_agent(args, args.url, skills))
    # The server's log is kept only when the run fails, for the error points at it.
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(
            tempfile.NamedTemporaryFile("w", prefix="ember-agent-server-", suffix=".log", delete=False)
        )
        print(f"ember: starting the model server for this run (log: {log.name})", file=sys.stderr)
        try:
            server = stack.enter_context(running_server(*(["--model", args.model] if args.model else []), log=log))
        except RuntimeError as e:  # it exited or never became healthy: its log says why
            raise ValueError(f"the model server did not start: {e}") from e
        rc = asyncio.run(run_agent(args, f"{server.url}/v1", skills))
    if rc == 0:
        Path(log.name).unlink()
    return rc


def cmd_mcp_sandbox(args: argparse.Namespace) -> int:
    from ember.agents.cli import serve_sandbox

    return serve_sandbox(args)


def cmd_mcp_skills(args: argparse.Namespace) -> int:
    from ember.agents.cli import serve_skills

    return serve_skills(args)


def cmd_skills_list(args: argparse.Namespace) -> int:
    from ember.agents.cli import list_skills

    return list_skills(args)


def cmd_skills_validate(args: argparse.Namespace) -> int:
    from ember.agents.cli import validate_skills

    return validate_skills(args)


def engine_command(
    subparsers: Any,
    name: str,
    help: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    func: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A subcommand that loads a model: the engine's options, then its own."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help)
    add_engine_args(parser)
    add_args(parser)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ember",
        description="Ember: a fast LLM inference engine (paged KV cache, continuous batching) and an agent runtime.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="complete a prompt and print the text as it is generated")
    gen.add_argument("prompt", help="the prompt text (no chat template; see `ember chat`)")
    gen.add_argument("--lora", metavar="PATH", default=None, help="generate with this LoRA adapter (a PEFT directory)")
    add_engine_args(gen)
    add_sampling_args(gen, max_tokens=64)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="an interactive chat in the terminal, with the model's chat template")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE_OR_TEMPLATE",
        help="a Jinja chat template used instead of the model's",
    )
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)
    from ember.server.serve import add_serve_args, serve

    srv = sub.add_parser(
        "serve", help="serve the OpenAI-compatible API (chat, completions, responses, embeddings, models, metrics)"
    )
    srv.add_argument("model_path", nargs="?", metavar="MODEL", help="the model, as --model (vllm serve's form)")
    add_engine_args(srv)
    add_serve_args(srv)
    srv.set_defaults(func=serve)
    from ember.server.run_batch import add_run_batch_args, run_batch

    engine_command(
        sub,
        "run-batch",
        "answer a JSONL file of OpenAI Batch API requests offline, as the server would (exit 1 if any failed)",
        add_run_batch_args,
        run_batch,
    )
    bench = sub.add_parser(
        "bench", help="measure Ember: throughput vs baselines, a server's latency, agent sessions, speculation"
    )
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    from ember.bench.throughput import add_throughput_args

    engine_command(
        bench_sub,
        "throughput",
        "output tok/s of Ember and of HF baselines on one workload, in the same run",
        add_throughput_args,
        cmd_bench_throughput,
    )
    from ember.bench.serving import add_serve_bench_args

    serve_bench = bench_sub.add_parser(
        "serve", help="TTFT, TPOT, ITL and throughput of a running server at several concurrency levels"
    )
    add_serve_bench_args(serve_bench)
    serve_bench.set_defaults(func=cmd_bench_serve)
    from ember.bench.agentic import add_agentic_args

    engine_command(
        bench_sub,
        "agentic",
        "multi-turn agent sessions with a shared prefix: TTFT with prefix caching on and off",
        add_agentic_args,
        cmd_bench_agentic,
    )
    from ember.bench.latency import add_latency_args

    engine_command(
        bench_sub,
        "latency",
        "per-token latency with and without speculative decoding (or predicted outputs), at several batch sizes",
        add_latency_args,
        cmd_bench_latency,
    )
    from ember.bench.lora import add_lora_bench_args

    engine_command(
        bench_sub,
        "lora",
        "output tok/s and TPOT with no LoRA adapter, one, and several mixed in each batch",
        add_lora_bench_args,
        cmd_bench_lora,
    )
    tune = sub.add_parser(
        "tune-kernels",
        help="time the attention kernels' launch options on this GPU and save the fastest, used from then on "
        "(`ember tune-kernels --help`)",
        add_help=False,  # its own parser's (ember/kernels/tune_attention.py): it imports torch and Triton
    )
    tune.set_defaults(func=cmd_tune_kernels)  # its arguments: what `main` leaves unparsed
    from ember.agents.cli import add_agent_args, add_mcp_transport_args, add_sandbox_args

    agent = sub.add_parser(
        "agent",
        help="run a task through the tool-calling loop: a model behind the OpenAI API, MCP tools, a sandbox",
        description="Runs TASK as an agent: the model is asked, the tools it calls are run (MCP servers, the "
        "sandbox, skills, memory), their results handed back, until it answers or --max-turns is reached. "
        "Without TASK, a conversation: each line typed (or piped in) is the next message. Model text goes to "
        "stdout, tool calls and results to stderr.",
    )
    add_agent_args(agent)
    agent.set_defaults(func=cmd_agent)
    mcp = sub.add_parser("mcp", help="Ember's MCP servers, over stdin/stdout or Streamable HTTP (--port)")
    mcp_sub = mcp.add_subparsers(dest="mcp_command", required=True, metavar="SERVER")
    sandbox = mcp_sub.add_parser(
        "sandbox", help="run_python and run_shell in a bubblewrap sandbox (no network; /workspace keeps files)"
    )
    add_sandbox_args(sandbox)
    add_mcp_transport_args(sandbox)
    sandbox.set_defaults(func=cmd_mcp_sandbox)
    mcp_skills = mcp_sub.add_parser(
        "skills",
        help="Agent Skills (SKILL.md folders): activate_skill and read_skill_file; with --sandbox, run their scripts",
    )
    mcp_skills.add_argument("skills", nargs="+", metavar="DIR", help="a skill folder, or a folder of skills")
    mcp_skills.add_argument(
        "--sandbox", action="store_true", help="add run_python and run_shell; skill folders are at /skills/<name>"
    )
    add_sandbox_args(mcp_skills)
    add_mcp_transport_args(mcp_skills)
    mcp_skills.set_defaults(func=cmd_mcp_skills)
    skills = sub.add_parser("skills", help="Agent Skills (SKILL.md folders): list what an agent would see, validate")
    skills_sub = skills.add_subparsers(dest="skills_command", required=True, metavar="ACTION")
    for action, func, text in (
        ("list", cmd_skills_list, "the skills under these folders: name, description, folder, files"),
        ("validate", cmd_skills_validate, "check each skill against the Agent Skills spec; exit 1 on any breach"),
    ):
        p = skills_sub.add_parser(action, help=text, description=text)
        p.add_argument("skills", nargs="+", metavar="DIR", help="a skill folder, or a folder of skills")
        p.set_defaults(func=func)
    return parser


def cmd_tune_kernels(args: argparse.Namespace) -> int:
    from ember.kernels.tune_attention import main as tune_main

    return tune_main(args.args)


def show_engine_log() -> None:
    """Ember's own log lines (start-up steps such as CUDA-graph capture, fallbacks) on stderr."""
    log = logging.getLogger("ember")
    if log.handlers:  # main() already ran in this process
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ember: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    if args.command == "tune-kernels":
        args.args = unparsed
    elif unparsed:
        parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    show_engine_log()
    args.argv = argv
    func: Callable[[argparse.Namespace], int] = args.func
    from ember.agents.sandbox import SandboxUnavailable

    try:
        return func(args)
    except (ValueError, SandboxUnavailable) as e:  # bad input, a missing model or tool: a message, not a traceback
        print(f"ember: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
