"""A prompt prefilled in chunks (prefill, then Decoder.extend) is the prompt prefilled at once:
the same logits at its last token, the same cache, and the same decode steps after it."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding, kv_cache
from tests.test_decoder import CFG, _split_random_model, _with_cache

MAX_LEN, CHUNK = 32, 8


def prefill_then_decode(graphdef, params, cache, prompt, chunk: int | None, steps: int = 3):
    """Logits at the prompt's end and after `steps` greedy decode steps; the final cache."""
    n = len(prompt)
    if chunk is None:
        padded = np.zeros((1, 32), np.int32)
        padded[0, :n] = prompt
        logits, cache = decoding.prefill(graphdef, params, cache, padded, jnp.array([n]))
    else:
        first = prompt[:chunk]
        logits, cache = decoding.prefill(
            graphdef, params, cache, jnp.array([first]), jnp.array([len(first)])
        )
        for start in range(chunk, n, chunk):
            part = prompt[start : start + chunk]
            padded = np.zeros((1, chunk), np.int32)
            padded[0, : len(part)] = part
            logits, cache = decoding.extend(graphdef, params, cache, padded, jnp.array([len(part)]))
    out = [np.asarray(logits)]
    for _ in range(steps):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits, cache = decoding.decode_step(graphdef, params, cache, token)
        out.append(np.asarray(logits))
    return np.stack(out), cache


@pytest.mark.parametrize("layout", kv_cache.LAYOUTS)
@pytest.mark.parametrize("prompt_len", [8, 21])
def test_chunked_prefill_is_prefill_at_once(layout, prompt_len):
    cfg = dataclasses.replace(CFG, cache_layout=layout)
    graphdef, params = _split_random_model(cfg)
    prompt = np.random.default_rng(prompt_len).integers(0, cfg.vocab_size, prompt_len)
    runs = {}
    for chunk in (None, CHUNK):
        g, p, cache = _with_cache(graphdef, params, 1, MAX_LEN)
        runs[chunk] = prefill_then_decode(g, p, cache, prompt.astype(np.int32), chunk)
    (whole, cache_a), (chunked, cache_b) = runs[None], runs[CHUNK]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    assert np.abs(np.diff(whole, axis=0)).max() > 1e-2  # the steps' logits differ
    real = prompt_len + 2  # positions holding tokens; the rest is padding the mask hides
    for a, b in zip(cache_a["blocks"].values(), cache_b["blocks"].values(), strict=True):
        lengths = b["attn"]["cache"]["lengths"][...]
        np.testing.assert_array_equal(lengths, a["attn"]["cache"]["lengths"][...])
        assert int(lengths[0]) == prompt_len + 3
        k_a, k_b = a["attn"]["cache"]["k"][...], b["attn"]["cache"]["k"][...]
        seq = (slice(None), slice(0, real)) if layout == "bksh" else (0, slice(0, real))
        np.testing.assert_allclose(k_b[seq], k_a[seq], rtol=1e-5, atol=1e-5)
