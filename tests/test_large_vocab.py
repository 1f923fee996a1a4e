"""Models at the shapes people run: 128 experts top-8 and vocabularies of 151,936 and
262,144 tokens (synth --vocab-size), with prompts of 2,048 tokens."""

from __future__ import annotations

import numpy as np
import psutil

from hobbit.compute.engine.model import Model, RunOptions
from hobbit.compute.engine.weights import open_model

from test_parity import assert_parity

QWEN3 = dict(arch="qwen3moe", layers=2, d_model=128, d_ff=128, experts=128, top_k=8, heads=4, kv_heads=2)


def test_a_qwen3_vocabulary_loads_in_llama_cpp_and_matches(synth):
    path = synth(**QWEN3, vocab_size=151936)
    assert open_model(path).args.n_vocab == 151936
    assert_parity(path, n_decode=8)


def test_a_long_prompt_on_a_262k_vocabulary_computes_one_row_of_logits(synth):
    """A 2,048-token prompt: the (T, V) logits of every position would be 2 GiB; generation
    asks for the last row's, and the process grows by far less than one chunk's rows."""
    path = synth(**QWEN3, vocab_size=262144)
    tokens = np.random.default_rng(0).integers(100, 40000, 2048)
    model = Model(open_model(path), RunOptions(n_ctx=2048))
    rss = psutil.Process().memory_info().rss
    try:
        logits = model.forward(tokens)
        grown = psutil.Process().memory_info().rss - rss
    finally:
        model.close()
    assert logits.shape == (262144,) and np.isfinite(logits).all()
    assert grown < 256 << 20, f"the forward grew the process by {grown >> 20} MiB"


def test_perplexity_of_a_long_chunk_on_a_262k_vocabulary_holds_one_batch_of_logits(synth):
    """Evaluation takes its logits a batch at a time and scores them in blocks: a chunk of
    1,024 positions held 1,083 MiB at once before (measured); a batch of 256 rows is 256 MiB
    in ggml's buffer and 256 MiB copied out, and the blocks scored are 32 rows."""
    from hobbit.compute.measure.evaluate import perplexity

    path = synth(**QWEN3, vocab_size=262144)
    tokens = np.random.default_rng(1).integers(100, 40000, 2048).tolist()
    model = Model(open_model(path), RunOptions(n_ctx=1024, n_batch=256))
    rss = psutil.Process().memory_info().rss
    try:
        r = perplexity(model, tokens, ctx=1024, chunks=1)
        grown = psutil.Process().memory_info().rss - rss
    finally:
        model.close()
    assert r["scored"] == 511 and np.isfinite(r["ppl"])
    assert grown < 704 << 20, f"perplexity grew the process by {grown >> 20} MiB"


def resident_share(path: str, offset: int, nbytes: int) -> float:
    """The share of the file's pages in [offset, offset + nbytes) that are in the page cache
    (mincore(2) over a fresh read-only mapping of that range)."""
    import ctypes
    import mmap
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    start = offset // page * page
    length = offset + nbytes - start
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = ctypes.create_string_buffer((length + page - 1) // page)
        try:
            assert libc.mincore(addr, length, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, length)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) / len(vec.raw)


def test_through_hobbitd_the_embedding_is_read_by_rows_and_not_counted_as_resident(synth, tmp_path):
    """The client reads ahead what it computes with on every token, not the token embedding,
    whose rows it reads on use (before: 74 % of the embedding in memory after these 9 tokens,
    measured): after a short generation on a 262k vocabulary the embedding is still on flash,
    and a budget does not count it."""
    import os

    from hobbit.compute.client.expert_client import ExpertClient
    from hobbit.loader.layout import client_resident_bytes, gguf_experts, routed_expert_tensors

    from daemon_util import run_daemon

    path = synth(**QWEN3, vocab_size=262144, seed=3)
    w = open_model(path)
    emb = w.tensors["token_embd.weight"]
    others = client_resident_bytes(w)
    expert_bytes = sum(w.tensors[n].nbytes for n in routed_expert_tensors(w))
    assert 0 < others <= os.path.getsize(path) - expert_bytes - emb.nbytes

    src = gguf_experts(w)
    with run_daemon([path], src.n_layer * src.n_expert * src.format.slot_bytes, tmp_path) as d:
        # the file's pages out of the page cache (written: synced first), after both processes
        # parsed its header (the kernel reads ahead of a header's last page)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        assert resident_share(path, emb.offset, emb.nbytes) < 0.05
        client = ExpertClient(d.socket, path)
        model = Model(w, RunOptions(n_ctx=64), experts=client)
        try:
            token = [1, 500, 900]
            for _ in range(6):
                token = [int(np.argmax(model.forward(token)))]
        finally:
            model.close()
            client.close()
    out = w.tensors["output.weight"]
    assert resident_share(path, out.offset, out.nbytes) > 0.9  # read ahead and computed with
    assert resident_share(path, emb.offset, emb.nbytes) < 0.05  # 9 rows of 262,144
