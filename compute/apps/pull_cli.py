"""`hobbit-cli pull REPO[:QUANT] [--file NAME]`: the command line of build/pull.py.

stdout gets one line, the path to give chat, generate, serve or hobbitd; the rest (bars,
the summary) goes to stderr, so `model=$(hobbit-cli pull -q REPO:QUANT)` works."""

from __future__ import annotations

import sys


def cmd_pull(args) -> int:
    from huggingface_hub.utils import logging as hf_logging

    from ..make.pull import PullOptions, parse_ref, pull, size_text

    repo, quant = parse_ref(args.ref)
    # http_get logs each in-process retry as a warning of two lines; a failure that outlasts
    # them is reported by our one-line error instead
    hf_logging.set_verbosity_error()
    got = pull(PullOptions(repo=repo, quant=quant, file=args.file, revision=args.revision, progress=not args.quiet))
    if not args.quiet:
        n = len(got.files)
        what = (f"{n} files" if n > 1 else "1 file") + f", {size_text(got.total_bytes)}"
        how = f"{size_text(got.fetched_bytes)} fetched, sha256 verified" if got.fetched_bytes else "already pulled"
        print(f"{repo}@{got.commit[:12]}: {what}, {how}; chat with: hobbit-cli chat {got.path}", file=sys.stderr)
    print(got.path)
    return 0


# argparse's help formatter reflows the lines
DESCRIPTION = """Download the GGUF model of QUANT (e.g. Q4_K_M; any case) from the Hub model repo
REPO into the models folder ($XDG_DATA_HOME/hobbit/models): every part of a split model, no
mmproj file. Without QUANT: the repo's only GGUF model. An interrupted pull resumes where it
stopped; each file's sha256 is checked against the Hub's before it appears in the folder.
Prints the path to run. Honours HF_ENDPOINT and HF_TOKEN."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pull", prog="hobbit-cli pull", description=DESCRIPTION, help="download a GGUF model from the Hugging Face Hub"
    )
    p.add_argument("ref", metavar="REPO[:QUANT]", help="e.g. unsloth/Qwen3-30B-A3B-GGUF:Q4_K_M")
    p.add_argument(
        "--file",
        metavar="NAME",
        default=None,
        help="one exact file of the repo instead of a quant (a split model's first part: all its parts)",
    )
    p.add_argument(
        "--revision", metavar="REV", default=None, help="branch, tag or commit (default: the repo's default branch)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, no summary")
    p.set_defaults(func=cmd_pull)
