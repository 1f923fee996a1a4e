"""Benchmarks (placeholder until implemented)."""


def add_parser(sub):
    pass
