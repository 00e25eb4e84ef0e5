"""Benchmark: one layer's decode attention over its KV cache in each cache layout, and through
`jax.nn.dot_product_attention`, to choose batching.workloads.decoder.DEFAULT_LAYOUT by measurement.

    python -m experiments.attention_layouts
    python -m experiments.attention_layouts --batches=1,8 --cache_lens=1024 --dtypes=float32

Each method is timed as the roofline times attention
(batching.measure.shape_bench.measure_attention_seconds: enough distinct caches per call to
overflow the last-level cache twice, so every cache is read from memory as in a decode step,
the call's dispatch floor taken off), at the default decoder's heads (4 kv heads, 3 queries
per kv head, head dim 64):

- `bksh`, `bskh`: the model's own attention (models.kv_cache.attend_cache) over that layout;
- `dpa_xla`: jax.nn.dot_product_attention(implementation="xla") over a [B, S, K, H] cache with
  the sequences' lengths as `key_value_seq_lengths` (grouped-query heads, one query token);
- `dpa_cudnn`: the same with implementation="cudnn" (cuDNN's fused attention), on a GPU and in
  16-bit dtypes only, where it applies; elsewhere one line says it was skipped.

The table gives µs per layer and the GB/s the cache is read at; the last line is JSON, with
the layout that was fastest at most shapes per dtype.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from batching.measure import microbench, shape_bench
from experiments import print_json
from models import kv_cache

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "8", "64"], "Sequences per step.")
flags.DEFINE_list("cache_lens", ["1024", "4096"], "Cache slots per sequence.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Cache dtypes.")
flags.DEFINE_integer("kv_heads", 4, "KV heads.")
flags.DEFINE_integer("q_per_kv", 3, "Query heads per KV head.")
flags.DEFINE_integer("head_dim", 64, "Head dimension.")
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")


def dpa_attend(implementation: str):
    """attend_cache's signature over a "bskh" cache, through jax.nn.dot_product_attention."""

    def attend(q_BxKxQxH, k_BxSxKxH, v_BxSxKxH, lengths_B, layout):
        del layout
        B, K, Q, H = q_BxKxQxH.shape
        q_Bx1xNxH = q_BxKxQxH.reshape(B, 1, K * Q, H).astype(k_BxSxKxH.dtype)
        out = jax.nn.dot_product_attention(
            q_Bx1xNxH,
            k_BxSxKxH,
            v_BxSxKxH,
            key_value_seq_lengths=lengths_B,
            implementation=implementation,
        )
        return out.reshape(B, K, Q, H).astype(jnp.float32)

    return attend


def methods(platform: str, dtype: str) -> dict[str, tuple[str, object] | str]:
    """name -> (cache layout, attend function), or a string saying why it is skipped."""
    out = {
        "bksh": ("bksh", kv_cache.attend_cache),
        "bskh": ("bskh", kv_cache.attend_cache),
        "dpa_xla": ("bskh", dpa_attend("xla")),
    }
    if platform != "gpu":
        out["dpa_cudnn"] = f"skipped: cuDNN attention needs a GPU (this is {platform})"
    elif dtype not in ("bfloat16", "float16"):
        out["dpa_cudnn"] = f"skipped: cuDNN attention takes 16-bit inputs, not {dtype}"
    else:
        out["dpa_cudnn"] = ("bskh", dpa_attend("cudnn"))
    return out


def measure(batches, cache_lens, dtypes, kv_heads, q_per_kv, head_dim) -> dict:
    device = jax.devices()[0]
    floor = microbench.measure_dispatch_floor(device)
    result = {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "rows": [],
        "skipped": {},
    }
    for dtype in dtypes:
        for S in cache_lens:
            for B in batches:
                shape = (B, kv_heads, S, q_per_kv, head_dim)
                cache_bytes = 2 * B * kv_heads * S * head_dim * jnp.dtype(dtype).itemsize
                row = {"dtype": dtype, "batch": B, "cache_len": S, "cache_bytes": cache_bytes}
                for name, how in methods(device.platform, dtype).items():
                    if isinstance(how, str):
                        result["skipped"][f"{name}/{dtype}"] = how
                        continue
                    layout, attend = how
                    try:
                        s = shape_bench.measure_attention_seconds(
                            device, dtype, layout, shape, attend, floor
                        )
                    except Exception as e:  # noqa: BLE001 - a method that cannot run says why
                        result["skipped"][f"{name}/{dtype}"] = f"failed: {type(e).__name__}: {e}"
                        continue
                    row[f"{name}_us"] = s * 1e6
                    row[f"{name}_gbytes_per_s"] = cache_bytes / s / 1e9
                result["rows"].append(row)
    result["fastest_layout"] = fastest(result["rows"])
    return result


def fastest(rows: list[dict]) -> dict[str, str]:
    """Per dtype, the cache layout (bksh or bskh, the model's attention) faster at most shapes."""
    out = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        wins = {"bksh": 0, "bskh": 0}
        for r in rows:
            if r["dtype"] == dtype and "bksh_us" in r and "bskh_us" in r:
                wins["bksh" if r["bksh_us"] <= r["bskh_us"] else "bskh"] += 1
        if any(wins.values()):
            out[dtype] = max(wins, key=wins.get)
    return out


def table(result: dict) -> str:
    names = ["bksh", "bskh", "dpa_xla", "dpa_cudnn"]
    header = f"{'dtype':<9} {'B':>4} {'S':>6} {'cache MB':>9} " + " ".join(
        f"{n + ' µs':>13}" for n in names
    )
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        cells = [
            f"{r[n + '_us']:>13.1f}" if n + "_us" in r else f"{'–':>13}" for n in names
        ]  # fmt: skip
        lines.append(
            f"{r['dtype']:<9} {r['batch']:>4} {r['cache_len']:>6} {r['cache_bytes'] / 1e6:>9.1f} "
            + " ".join(cells)
        )
    for what, why in result["skipped"].items():
        lines.append(f"{what}: {why}")
    lines.append(f"fastest layout at most shapes: {result['fastest_layout']}")
    return "\n".join(lines)


def main(argv):
    del argv
    result = measure(
        [int(b) for b in FLAGS.batches],
        [int(s) for s in FLAGS.cache_lens],
        FLAGS.dtypes,
        FLAGS.kv_heads,
        FLAGS.q_per_kv,
        FLAGS.head_dim,
    )
    print(f"{result['device_kind']} ({result['platform']}), jax {result['jax_version']}")
    print(table(result))
    print_json(result, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
