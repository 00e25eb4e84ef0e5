"""A decoder behind fixed slots: prefill one request, insert it, step every slot at once.

JetStream's shape (AI-Hypercomputer/JetStream: prefill, insert into a decode slot, then
generate over all slots). The engine holds a cache of `slots` sequences of `max_len`
positions. Its three jitted functions compile once per run.

- `prefill(prompt)`: one request's prompt into a one-slot cache; its first token (greedy).
- `insert(slot)`: that cache into the slot of the running batch's cache.
- `step(tokens, active)`: one decode step over all slots; the next token of each. An
  inactive slot computes like the rest (the step's shape never changes), and its length
  goes back to 0, so it never runs past `max_len`. For an MoE decoder it also keeps
  `reached`, the experts each slot's token reached in each MoE block ([blocks, slots]),
  from the routing's own statistics (models.routers.routing_stats `experts_per_token`).
- `prefill_chunk(tokens, first)`: with `chunk` > 0, the next `chunk` tokens of a prompt into
  the one-slot cache (a prefill for the first, Decoder.extend after it): Sarathi-Serve's
  chunked prefill, run between decode steps rather than fused into them.

Prompts are padded to a power of two, at most `max_len`. The request's own length masks
the padding. So prefills compile at most log2(max_len) times.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from batching.workloads import decoder as decoder_workload
from models import decoder, decoding


def bucket(prompt_len: int, max_len: int) -> int:
    """The padded length a prompt is prefilled at: a power of two, at most `max_len`."""
    return min(1 << max(prompt_len - 1, 0).bit_length(), max_len)


def _programs(graphdef: nnx.GraphDef, moe: bool, params_tree, cache_tree) -> tuple:
    """The engine's jitted prefill, extend, insert and step, over flat lists of arrays.

    Each cache argument is donated. An MoE's step also returns its experts per slot.
    """

    def flat(fn):
        """fn(params, cache, *rest) -> (out, cache) over the flat lists."""

        def call(params_leaves, cache_leaves, *rest):
            params = jax.tree.unflatten(params_tree, params_leaves)
            out, cache = fn(params, jax.tree.unflatten(cache_tree, cache_leaves), *rest)
            return out, jax.tree.leaves(cache)

        return call

    def prefill(params, cache, tokens_1xL, lengths_1):
        logits_1xV, cache = decoding.prefill(graphdef, params, cache, tokens_1xL, lengths_1)
        return jnp.argmax(logits_1xV, axis=-1).astype(jnp.int32), cache

    def insert(cache, one, slot):
        def put(big, small):
            start = (slot * small.shape[0],) + (0,) * (big.ndim - 1)
            return jax.lax.dynamic_update_slice(big, small, start)

        return jax.tree.map(put, cache, one)

    def step(params, cache, tokens_B, active_B):
        logits_BxV, cache, *stats = decoding.decode_step(
            graphdef, params, cache, tokens_B, stats=moe
        )
        cache = decoder_workload.map_lengths(cache, lambda n: jnp.where(active_B, n, 0))
        tokens = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        if not moe:
            return tokens, cache
        return (tokens, jnp.stack([s["experts_per_token"] for s in stats[0]])), cache

    def extend(params, cache, tokens_1xC, counts_1):
        logits_1xV, cache = decoding.extend(graphdef, params, cache, tokens_1xC, counts_1)
        return jnp.argmax(logits_1xV, axis=-1).astype(jnp.int32), cache

    return (
        jax.jit(flat(prefill), donate_argnums=1),
        jax.jit(flat(extend), donate_argnums=1),
        jax.jit(insert, donate_argnums=0),
        jax.jit(flat(step), donate_argnums=1),
    )


class Engine:
    """A decoder's weights and its slot cache, with the loop's compiled calls."""

    def __init__(self, model: decoder.Decoder, slots: int, max_len: int, chunk: int = 0):
        model.init_cache(slots, max_len)
        self.graphdef, params, cache = nnx.split(model, decoder.WEIGHTS, nnx.Cache)
        model.init_cache(1, max_len)
        one_slot = nnx.state(model, nnx.Cache)
        model.init_cache(1, 1)  # the module keeps no big buffers
        # Weights and caches are held as flat lists of arrays: a call passes plain lists, not
        # nnx.State trees, whose flattening on every decode step costs host time.
        params_tree, cache_tree = jax.tree.structure(params), jax.tree.structure(cache)
        self.params, self.cache = jax.tree.leaves(params), jax.tree.leaves(cache)
        self.one_slot = jax.tree.leaves(one_slot)
        if chunk and max_len % chunk:
            raise ValueError(f"serve.chunk_tokens {chunk} must divide serve.max_len {max_len}")
        self.slots, self.max_len, self.chunk = slots, max_len, chunk
        self.vocab = model.cfg.vocab_size
        self.moe = bool(decoder.moe_layers(model.cfg))
        # An MoE's (router, top_k): what a token's routing wants (batching.serve.session).
        self.routing = (
            (model.cfg.moe_config().router, model.cfg.moe_config().top_k) if self.moe else None
        )
        self.reached: np.ndarray | None = None  # after an MoE step: [blocks, slots]
        self._prefill, self._extend, self._insert, self._step = _programs(
            self.graphdef, self.moe, params_tree, cache_tree
        )

    def bucket(self, prompt_len: int) -> int:
        """The padded length a prompt is prefilled at."""
        return bucket(prompt_len, self.max_len)

    def prefill(self, prompt: np.ndarray) -> int:
        """Prefills one prompt into the one-slot cache; returns its first token.

        Prefill starts its sequence afresh, so the one-slot cache is reused request after
        request (donated, and replaced by the prefilled one).
        """
        padded = np.zeros((1, self.bucket(len(prompt))), np.int32)
        padded[0, : len(prompt)] = prompt
        lengths = np.array([len(prompt)], np.int32)
        token, self.one_slot = self._prefill(self.params, self.one_slot, padded, lengths)
        return int(token[0])

    def prefill_chunk(self, part: np.ndarray, first: bool) -> int:
        """The next chunk of a prompt into the one-slot cache; the greedy token after it.

        The first chunk starts the sequence afresh. A chunk shorter than `chunk` is padded.
        Chunks start at multiples of `chunk`, which divides max_len, so none runs past it.
        """
        padded = np.zeros((1, self.chunk), np.int32)
        padded[0, : len(part)] = part
        count = np.array([len(part)], np.int32)
        fn = self._prefill if first else self._extend
        token, self.one_slot = fn(self.params, self.one_slot, padded, count)
        return int(token[0])

    def insert(self, slot: int) -> None:
        """Copies the last prefilled request into `slot` of the running cache."""
        self.cache = self._insert(self.cache, self.one_slot, np.int32(slot))

    def step(self, tokens_B: np.ndarray, active_B: np.ndarray) -> np.ndarray:
        """One decode step over every slot: each slot's next token (host array)."""
        out, self.cache = self._step(self.params, self.cache, tokens_B, active_B)
        if self.moe:
            out, reached = out
            self.reached = np.asarray(reached)
        return np.asarray(out)

    def warm_up(self, prompt_lens: list[int]) -> None:
        """Compiles every call the loop will make, outside the served clock."""
        for length in sorted({self.bucket(n) for n in prompt_lens}):
            self.prefill(np.zeros(length, np.int32))
            self.insert(0)
        if self.chunk:
            self.prefill_chunk(np.zeros(self.chunk, np.int32), first=True)
            self.prefill_chunk(np.zeros(self.chunk, np.int32), first=False)
        self.step(np.zeros(self.slots, np.int32), np.zeros(self.slots, bool))
