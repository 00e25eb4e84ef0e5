import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batching import app
from batching.measure import timing
from tests.conftest import tiny


class _Output:
    """A call's output the test can watch: alive or not, waited on or not."""

    def __init__(self, delay_s: float = 0.0):
        self.waited = False
        self.delay_s = delay_s

    def block_until_ready(self):
        time.sleep(self.delay_s)
        self.waited = True
        return self


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
    """Outputs that say when they were waited on: the second takes 30 ms to become ready, so
    a sample is that long only if the timer waits on every leaf inside the clock. A bound set
    by a sleep, not a comparison of two timings, holds on a busy machine too."""
    outs = []

    def call():
        outs.append((_Output(), _Output(delay_s=0.03)))
        return outs[-1]

    m = timing.measure(call, (), fast_settings(min_runs=3, max_runs=3))
    assert all(a.waited and b.waited for a, b in outs)
    assert m.samples_s.min() >= 0.03


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


def _watched_call(alive_at_call: list[bool]):
    last = [lambda: None]

    def call():
        alive_at_call.append(last[0]() is not None)
        out = _Output()
        last[0] = weakref.ref(out)
        return out

    return call


@pytest.mark.parametrize("keep", [False, True])
def test_previous_outputs_are_released_before_the_next_call_unless_kept(keep):
    alive = []
    m = timing.measure(
        _watched_call(alive), (), fast_settings(max_runs=30, warmup_runs=3), keep_outputs=keep
    )
    assert len(alive) == 3 + m.samples_s.size
    # The first call has no predecessor; every later one sees it dead (released) or alive.
    assert alive[1:] == [keep] * (len(alive) - 1)


def test_next_args_are_ready_before_the_clock_starts():
    made = []

    def next_args(args, out):
        made.append(_Output())
        return (made[-1],)

    timing.measure(lambda x: _Output(), (None,), fast_settings(max_runs=10), next_args)
    assert made and all(o.waited for o in made)


def test_highest_precision_compiles_once_and_times_that_program(tmp_path, monkeypatch):
    """The timed executable is the one compiled under the run's precision: one lowering of the
    timed function per point, and its HLO asks for the highest precision."""
    lowered, timed = [], []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(kw.get("fun_name", ""))

    measure = timing.measure
    monkeypatch.setattr(
        timing, "measure", lambda call, *a, **k: timed.append(call) or measure(call, *a, **k)
    )
    config = tiny(matmul_precision="highest")
    config.sweep.batch_sizes = (2,)
    config.roofline.enabled = False
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        app.run(config, str(tmp_path))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [n for n in lowered if "flat_fn" in n] == ["jit(flat_fn)"]
    assert len(timed) == 1 and "operand_precision={highest,highest}" in timed[0].as_text()
