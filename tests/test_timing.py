import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batching import timing


def fast_settings(**kw):
    base = dict(warmup_runs=1, warmup_s=0.0, min_runs=5, max_runs=2000, budget_s=0.5)
    base.update(kw)
    return timing.TimingSettings(**base)


def test_stops_on_precision_for_a_steady_call():
    call = lambda: time.sleep(0.002)
    m = timing.measure(call, (), fast_settings(target_rel_ci=0.5, budget_s=5.0))
    assert m.stop_reason == "precision"
    assert m.converged
    assert m.samples_s.size >= 5
    assert np.median(m.samples_s) >= 0.002


def test_stops_on_budget_when_precision_is_unreachable():
    rng = np.random.default_rng(0)
    # Latencies spread over two orders of magnitude never reach a ±0.1% median.
    call = lambda: time.sleep(float(rng.choice([0.0001, 0.003])))
    m = timing.measure(call, (), fast_settings(target_rel_ci=0.001, budget_s=0.2))
    assert m.stop_reason == "budget"
    assert not m.converged
    assert m.wall_s < 1.0


def test_stops_at_max_runs():
    m = timing.measure(lambda: None, (), fast_settings(max_runs=7, target_rel_ci=1e-9))
    assert m.stop_reason == "max_runs"
    assert m.samples_s.size == 7


def test_min_runs_is_respected_even_when_precise():
    m = timing.measure(lambda: None, (), fast_settings(min_runs=40, target_rel_ci=10.0))
    assert m.samples_s.size >= 40


def test_blocks_on_every_output_leaf():
    # A call returning a tuple whose second element is slow must be timed in full.
    x = jnp.ones((256, 256))
    slow = jax.jit(lambda x: (x[0, 0], jnp.linalg.matrix_power(x / 256, 64)))
    compiled = timing.compile_fn(slow, (x,))
    m = timing.measure(compiled.call, (x,), fast_settings(budget_s=0.2))
    ref = timing.measure(
        lambda x: jax.block_until_ready(compiled.executable(x)), (x,), fast_settings(budget_s=0.2)
    )
    assert np.median(m.samples_s) > 0.5 * np.median(ref.samples_s)


def test_next_args_threads_outputs_between_calls():
    seen = []

    def call(i):
        seen.append(i)
        return i + 1

    timing.measure(call, (0,), fast_settings(max_runs=10, warmup_runs=2), lambda a, out: (out,))
    assert seen == list(range(len(seen)))


def test_compile_fn_reports_xla_costs():
    f = lambda a, b: a @ b
    a = jnp.ones((64, 32))
    b = jnp.ones((32, 16))
    c = timing.compile_fn(f, (a, b))
    assert c.compile_s > 0
    assert c.flops == pytest.approx(2 * 64 * 32 * 16, rel=0.05)
    assert c.bytes_accessed >= 4 * (64 * 32 + 32 * 16 + 64 * 16)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="timing.min_runs"):
        timing.TimingSettings(min_runs=1)
    with pytest.raises(ValueError, match="timing.budget_s"):
        timing.TimingSettings(budget_s=0)
