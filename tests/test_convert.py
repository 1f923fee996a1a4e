"""convert writes the same companion whatever the number of threads converting it."""

from __future__ import annotations

from hobbit.compute.engine import ggml
from hobbit.compute.engine.weights import open_model
from hobbit.compute.make.convert import convert


def test_every_core_writes_the_bytes_one_writes(synth, tmp_path):
    w = open_model(synth(layers=2, experts=8, top_k=2, d_model=256, d_ff=256, type="Q8_0"))
    one = convert(w, ggml.Q4_K, out=str(tmp_path / "one.hobbit"), progress=False, threads=1)
    many = convert(w, ggml.Q4_K, out=str(tmp_path / "many.hobbit"), progress=False, threads=3)
    with open(one, "rb") as a, open(many, "rb") as b:
        assert a.read() == b.read()
