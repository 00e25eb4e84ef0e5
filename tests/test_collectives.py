"""Collectives: bus-bandwidth factors, the microbenchmarks on 8 forced host devices, caching."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from batching import collectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bus_factors_follow_nccl_tests():
    assert collectives.bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    assert collectives.bus_factor("all_to_all", 8) == pytest.approx(7 / 8)
    assert collectives.bus_factor("all_gather", 4) == pytest.approx(3 / 4)
    # One device sends nothing.
    assert collectives.bus_factor("all_reduce", 1) == 0.0
    with pytest.raises(ValueError, match="all_reduce"):
        collectives.bus_factor("broadcast", 2)


def test_total_and_wire_bytes():
    cs = [
        collectives.entry("all_reduce", "model", 4, 1000, 6),
        collectives.entry("all_to_all", "expert", 8, 800, 2),
    ]
    assert collectives.total_bytes(cs) == 1000 * 6 + 800 * 2
    assert collectives.total_bytes(None) == 0.0
    assert collectives.wire_bytes(cs[0]) == pytest.approx(1000 * 6 * 1.5)
    assert collectives.wire_bytes(cs[1]) == pytest.approx(800 * 2 * 7 / 8)


CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import Mesh
    from batching import collectives

    cache_dir = sys.argv[1]
    devices = np.array(jax.devices()).reshape(2, 1, 4)
    mesh = Mesh(devices, ("data", "expert", "model"))
    first = collectives.mesh_bandwidths(mesh, cache_dir)
    calls = []
    real = collectives.measure
    collectives.measure = lambda *a, **k: calls.append(a) or real(*a, **k)
    second = collectives.mesh_bandwidths(mesh, cache_dir)
    print(json.dumps({"first": first, "second": second, "measured_again": len(calls),
                      "one_device_axis": collectives.bandwidth(mesh, "expert", "all_reduce",
                                                               cache_dir)}))
    """
)


def test_microbenchmarks_on_8_forced_host_devices_are_positive_and_cached(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    first = got["first"]
    # Only axes of more than one device communicate: data (2) and model (4), not expert (1).
    assert set(first) == {"data", "model"}
    for axis, n in (("data", 2), ("model", 4)):
        for kind in collectives.MEASURED:
            r = first[axis][kind]
            assert r["seconds"] > 0 and r["payload_bytes"] > 0
            assert r["algbw_bytes_per_s"] == pytest.approx(r["payload_bytes"] / r["seconds"])
            assert r["busbw_bytes_per_s"] == pytest.approx(
                r["algbw_bytes_per_s"] * collectives.bus_factor(kind, n)
            )
            # Host memory moves somewhere between 1 MB/s and 1 TB/s: anything else is a bug.
            assert 1e6 < r["busbw_bytes_per_s"] < 1e12
    assert got["measured_again"] == 0
    assert got["second"] == first
    assert got["one_device_axis"] is None
    with open(os.path.join(tmp_path, "device_peaks.json")) as f:
        cache = json.load(f)
    (entry,) = cache.values()
    assert set(entry["collectives"]) == {
        f"{kind}:n{n}:{collectives.DEFAULT_PAYLOAD_BYTES}B"
        for kind in collectives.MEASURED
        for n in (2, 4)
    }
