"""Command line: ``flashdecode generate | chat | bench | bench-e2e``.

Errors are printed as one line (no traceback) and exit with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from flashdecode import __version__

EXPECTED_ERRORS = (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError, ImportError)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="GGUF file or Hugging Face directory (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    g.add_argument("--eager", action="store_true", help="run every decode step eagerly (no CUDA graphs)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    s.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    s.add_argument("--system", default=None, help="system prompt (chat template only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashdecode", description="Fast LLM generation on flashdecode attention.")
    parser.add_argument("--version", action="version", version=f"flashdecode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{generate,chat,bench,bench-e2e}")
    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--raw", action="store_true", help="use the prompt as is (no chat template)")
    _add_model_args(gen)
    chat = sub.add_parser("chat", help="interactive chat that keeps the conversation's KV cache between turns")
    _add_model_args(chat)
    sub.add_parser("bench", help="benchmarks (arguments are passed to `flashdecode.bench`)", add_help=False)
    sub.add_parser("bench-e2e", help="end-to-end benchmark (`flashdecode bench --e2e ...`)", add_help=False)
    return parser


def _sampling(args: argparse.Namespace) -> Any:
    from flashdecode.engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)


def _load(args: argparse.Namespace) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flashdecode.engine import LLM

    start = time.perf_counter()
    tty = sys.stderr.isatty()
    if tty:
        print("loading model ...", file=sys.stderr, end="", flush=True)
    try:
        llm = LLM(args.model, device=args.device, dtype=args.dtype, cuda_graphs=False if args.eager else None)
    finally:
        if tty:
            print("\r\033[K", file=sys.stderr, end="", flush=True)
    name = os.path.basename(llm.source.path.rstrip(os.sep))
    print(f"loaded {name} ({llm.config.architecture}, {llm.device}, {str(llm.dtype).replace('torch.', '')}) "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return llm


def _consume(stream: Any) -> tuple[Any, float, float]:
    """Print a text stream; returns (output, seconds to first piece, total seconds)."""
    start = time.perf_counter()
    first = None
    while True:
        try:
            piece = next(stream)
        except StopIteration as stop:
            output = stop.value
            break
        if first is None:
            first = time.perf_counter() - start
        sys.stdout.write(piece)
        sys.stdout.flush()
    total = time.perf_counter() - start
    return output, first if first is not None else total, total


def _summary(output: Any, seconds: float, extra: str = "") -> str:
    n = len(output.token_ids)
    rate = n / seconds if seconds > 0 else float("inf")
    return f"[{n} tokens in {seconds:.2f} s, {rate:.1f} tokens/s, prompt {len(output.prompt_token_ids)} tokens" \
           f"{extra}, finish: {output.finish_reason}]"


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    params = _sampling(args)
    llm = _load(args)
    if args.raw or not llm.has_chat_template:
        prompt: Any = args.prompt
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
    output, _, total = _consume(llm.stream(prompt, params))
    print(file=sys.stdout, flush=True)
    print(_summary(output, total), file=sys.stderr, flush=True)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _load(args)
    if not llm.has_chat_template:
        raise ValueError("this model has no chat template; use `flashdecode generate --raw`")
    session = llm.chat_session(args.system)
    print("chat: empty line or /exit to quit, /reset to start over", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            break
        text = line.strip()
        if text in ("", "/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            continue
        try:
            output, _, total = _consume(session.send(text, params))
        except ValueError as exc:  # e.g. the conversation outgrew the context: keep the session usable
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(flush=True)
        print(_summary(output, total, f", {session.last_reused_tokens} reused from cache"), file=sys.stderr, flush=True)
    session.close()
    return 0


def cmd_bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("flashdecode.bench.cli")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("flashdecode.bench"):
            raise RuntimeError("benchmarks are not available in this installation (flashdecode.bench.cli missing)") from exc
        raise
    result = bench.main(argv)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        if argv and argv[0] == "bench-e2e":
            return cmd_bench(["--e2e", *argv[1:]])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 1
        return cmd_generate(args) if args.command == "generate" else cmd_chat(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        print(f"flashdecode: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
