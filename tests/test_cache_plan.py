"""How hobbitd splits a cache between precisions, at 128 experts a layer: mixed precision
starts in every cache exact mode starts in."""

from __future__ import annotations

import shutil

import pytest

from hobbit.compute.make.convert import convert
from hobbit.compute.engine import ggml
from hobbit.compute.engine.weights import open_model
from hobbit.loader.precision import HIGH, LOW
from hobbit.loader.served import ModelOptions, open_served_all, plan_cache
from hobbit.protocol.errors import InputError

MODEL = dict(layers=2, d_model=256, d_ff=256, experts=128, top_k=8, heads=4, kv_heads=2, type="Q8_0")


@pytest.fixture(scope="module")
def served(synth, tmp_path_factory):
    """{mode: the model as hobbitd opens it}: exact, and mixed with the paper's thresholds."""
    path = str(tmp_path_factory.mktemp("plan") / "m.gguf")
    shutil.copy(synth(**MODEL), path)
    convert(open_model(path), ggml.Q4_K, progress=False)
    exact = open_served_all([path], ModelOptions(low_type="Q4_K"))
    mixed = open_served_all([path], ModelOptions(low_type="Q4_K", t1=0.6, t2=0.9))
    return {
        "exact": next(iter(exact.values())),
        "mixed": next(iter(mixed.values())),
        "models": {"exact": exact, "mixed": mixed},
    }


def regions(models, size):
    plan, _ = plan_cache(models, size, 0.25)
    return {r.precision: r.n_slots for r in plan}


def test_mixed_starts_wherever_exact_does(served):
    mo = served["exact"]
    E, high, low = mo.n_expert, mo.source.format.slot_bytes, served["mixed"].low.format.slot_bytes
    smallest = E * high + 4096
    with pytest.raises(InputError, match="too small"):
        regions(served["models"]["exact"], E * high - high)
    for size in (smallest, int(1.3 * smallest), E * (high + low) + 2 * 4096, 3 * smallest):
        ex = regions(served["models"]["exact"], size)
        mx = regions(served["models"]["mixed"], size)  # the fixed 25 % low share refused these
        assert ex[HIGH] >= E and mx[HIGH] >= E, (size, ex, mx)
        assert mx.get(LOW, E) >= E, (size, mx)
    # room for both: each precision holds at least a layer; too little: high only (exact misses)
    assert set(regions(served["models"]["mixed"], E * (high + low) + 2 * 4096)) == {HIGH, LOW}
    assert set(regions(served["models"]["mixed"], smallest)) == {HIGH}
