"""Synthetic MoE GGUF maker (placeholder until implemented)."""


def add_parser(sub):
    pass
