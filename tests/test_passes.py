"""The pass is the unit: a point's estimate and interval from its pass medians, resampling
whole passes, tests and modes over passes, and the timer's own rules (no earlier samples,
no garbage collection, the cold cache's flush outside the clock)."""

import gc
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from batching.measure import cold, host, pass_stats, stats, timing
from batching.predict import knee, replicates


def shifted_passes(shifts, n=200, noise=0.01, seed=0):
    """Passes whose samples are tight around 1 ms times a shift per pass (a slow spell)."""
    rng = np.random.default_rng(seed)
    return [1e-3 * s * rng.lognormal(0, noise, n) for s in shifts]


@pytest.mark.parametrize("method", pass_stats.ESTIMATORS)
def test_passes_that_differ_give_an_interval_that_covers_them_and_do_not_converge(method):
    """Six passes 1.0-1.6x apart, each tight inside: the pooled samples' interval is a few
    tenths of a percent wide and misses most passes; the point's interval spans them."""
    passes = shifted_passes([1.0, 1.6, 1.1, 1.5, 1.2, 1.4])
    est = pass_stats.from_passes(passes, method)
    medians = [np.median(p) for p in passes]
    pooled_lo, pooled_hi = stats.median_interval(np.concatenate(passes))
    assert sum(pooled_lo <= m <= pooled_hi for m in medians) <= 1  # the old kind misses them
    assert est.low_s <= np.median(medians) <= est.high_s
    assert est.rel_halfwidth > 0.1  # far from a ±3% target: not converged
    assert est.pass_cv == pytest.approx(np.std(medians, ddof=1) / np.mean(medians))
    assert "6 passes" in est.method


def test_each_pass_weighs_the_same_whatever_its_sample_count():
    """One long slow pass beside short fast ones does not pull the estimate its way."""
    rng = np.random.default_rng(0)
    passes = [2e-3 * rng.lognormal(0, 0.01, 1000)] + [1e-3 * rng.lognormal(0, 0.01, 5)] * 5
    pooled_median = np.median(np.concatenate(passes))
    assert pooled_median > 1.9e-3  # today's pool: the long pass decides
    for method in pass_stats.ESTIMATORS:
        assert pass_stats.estimate([np.median(p) for p in passes], method) < 1.3e-3


@pytest.mark.parametrize("method", pass_stats.ESTIMATORS)
def test_weighted_estimates_equal_the_estimate_of_repeated_passes(method):
    rng = np.random.default_rng(1)
    v = rng.lognormal(0, 0.2, 7)
    w = rng.integers(0, 4, (50, 7)).astype(float)
    w[w.sum(axis=1) == 0, 0] = 1
    got = pass_stats.estimate(v, method, w)
    want = [pass_stats.estimate(np.repeat(v, wi.astype(int)), method) for wi in w]
    assert np.allclose(got, want)


def test_trimmed_estimate_is_the_20_percent_trimmed_mean_of_logs():
    v = np.random.default_rng(2).lognormal(0, 0.3, 11)
    want = math.exp(scipy_stats.trim_mean(np.log(v), 0.2))
    assert pass_stats.estimate(v, "trimmed") == pytest.approx(want)


@pytest.mark.parametrize("method", ["geomean", "trimmed"])
def test_the_interval_covers_the_true_value_at_about_its_confidence(method):
    """Pass medians drawn around a known latency: the 95% interval holds it in 92-98% of
    2,000 draws of six passes (the t and Tukey-McLaughlin intervals are exact for normal
    log values, near it for these)."""
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(2000):
        v = 1e-3 * rng.lognormal(0, 0.15, 6)
        lo, hi = pass_stats.interval(v, method, 0.95)
        hits += lo <= 1e-3 <= hi
    assert 0.92 <= hits / 2000 <= 0.98


def test_below_two_passes_there_is_no_spread_to_read():
    assert all(math.isnan(x) for x in pass_stats.interval(np.array([1e-3]), "geomean", 0.95))
    one = pass_stats.from_passes(shifted_passes([1.0]), "geomean")
    assert "within one pass" in one.method and math.isnan(one.pass_cv)


def test_passes_needed_follows_the_spread():
    assert pass_stats.passes_needed(0.16, 0.03) == pytest.approx(109, rel=0.02)
    assert pass_stats.passes_needed(0.08, 0.03) < pass_stats.passes_needed(0.16, 0.03) / 3


def test_replicates_draw_whole_passes_so_a_slow_spell_moves_every_point_together():
    """Pass i of every point slowed by the same factor: in the replicates two points move
    together (the same passes drawn for both); drawing each point's passes on its own, as
    the knee's interval did, leaves them unrelated."""
    spells = np.random.default_rng(4).lognormal(0, 0.2, 8)
    samples = {b: shifted_passes(spells * b, n=20, seed=b) for b in (1, 2, 4, 8)}
    draws = replicates.draw([1, 2, 4, 8], samples, "geomean", 2000)
    assert draws.kind == "passes"
    log = np.log(draws.latency_s)
    assert np.corrcoef(log[:, 0], log[:, 3])[0, 1] > 0.9


def test_replicates_of_one_pass_resample_its_samples_and_say_so():
    samples = {b: 1e-3 * b * np.random.default_rng(b).lognormal(0, 0.05, 50) for b in (1, 2)}
    draws = replicates.draw([1, 2], samples, "geomean", 100)
    assert draws.kind == "samples" and np.isfinite(draws.latency_s).all()


def test_points_with_fewer_passes_keep_their_own_in_each_replicate():
    samples = {1: shifted_passes([1, 1.1, 0.9]), 2: shifted_passes([2, 2.2, 1.8, 2.1, 1.9])}
    draws = replicates.draw([1, 2], samples, "median", 500)
    assert np.isfinite(draws.latency_s).all()
    assert draws.latency_s[:, 0].max() <= 1.1e-3 * 1.05


def test_the_knee_interval_comes_from_whole_passes_and_holds_its_estimate():
    """A known three-limit curve timed in six passes, each pass slowed as a whole: the
    knee's interval is drawn from passes and holds both the fitted and the true knee."""
    w, f1, bw, overhead = 33.5e6, 2 * 8.4e6, 25e9, 2e-4
    knee_true = 40.0
    f = knee_true * f1 / (w / bw)
    spells = np.random.default_rng(5).lognormal(0, 0.08, 6)
    rows, samples = [], {}
    for b in 2 ** np.arange(10):
        t = max(overhead, w / bw, f1 * b / f)
        passes = [p * t / 1e-3 for p in shifted_passes(spells, n=30, seed=int(b))]
        samples[int(b)] = passes
        latency = pass_stats.estimate([np.median(p) for p in passes], "geomean")
        rows.append({"batch_size": int(b), "latency_s": latency, "analytic_flops": f1 * b,
                     "analytic_bytes": w, "flops": None, "bytes_accessed": None,
                     "estimator": "geomean"})  # fmt: skip
    fit = knee.fit_knee(rows, samples, n_bootstrap=1000)
    assert fit.interval_from == "passes"
    assert fit.knee_low <= fit.knee_batch_size <= fit.knee_high
    assert fit.knee_low <= knee_true <= fit.knee_high


def test_the_exact_fit_is_never_worse_than_a_local_search():
    """fit_many tries every ordered split with its closed-form parameters: on noisy curves
    its loss is at most a Nelder-Mead fit's from several starts."""
    from scipy import optimize

    rng = np.random.default_rng(6)
    b = 2.0 ** np.arange(10)
    cost = knee.LinearCost(0.0, 1.7e7, 3.4e7, 1e4)
    for _ in range(20):
        truth = np.log([rng.uniform(1e-4, 3e-3), rng.uniform(5e9, 5e10), rng.uniform(5e10, 5e11)])
        t = knee.three_limits(truth, cost, b) * rng.lognormal(0, 0.1, b.size)
        lb, lf, y = np.log(cost.bytes(b)), np.log(cost.flops(b)), np.log(t)

        def loss(p, lb=lb, lf=lf, y=y):
            r = np.maximum(np.maximum(p[0], lb - p[1]), lf - p[2]) - y
            return float(r @ r)

        exact = loss(knee.fit_many(b, t[None, :], cost)[0])
        searched = min(
            optimize.minimize(loss, truth + rng.normal(0, 0.5, 3), method="Nelder-Mead").fun
            for _ in range(5)
        )
        assert exact <= searched + 1e-9


def test_free_batching_compares_passes_not_pooled_samples():
    """Batch 2 slower by 2% with a 10% spread between passes: pooled samples (thousands of
    tight calls) call it significant; its six passes do not."""
    spells = np.random.default_rng(7).lognormal(0, 0.1, 6)
    samples = {
        1: shifted_passes(spells, n=500, seed=1),
        2: shifted_passes(1.02 * spells[::-1], n=500, seed=2),
        4: shifted_passes(3 * spells, n=500, seed=4),
    }
    pooled = {b: np.concatenate(p) for b, p in samples.items()}
    assert stats.slower_than(pooled[1], pooled[2])[0]
    assert knee.free_batching_limit(samples) == (2, "passes")


def test_modes_ignore_a_shift_between_passes_and_find_two_programs_within_one():
    rng = np.random.default_rng(8)
    shifted = [1e-3 * s * rng.lognormal(0, 0.01, 60) for s in (1.0, 1.7, 1.0, 1.7)]
    assert stats.modes(np.concatenate(shifted)) is not None  # pooled, the shift reads as modes
    assert pass_stats.modes_within_passes(shifted) is None
    two = [1e-3 * np.concatenate([rng.lognormal(0, 0.01, 40), 1.5 * rng.lognormal(0, 0.01, 20)])
           for _ in range(4)]  # fmt: skip
    found = pass_stats.modes_within_passes(two)
    assert found is not None
    assert found[0]["median_s"] == pytest.approx(1e-3, rel=0.03)
    assert found[1]["median_s"] == pytest.approx(1.5e-3, rel=0.03)
    assert found[0]["share"] == pytest.approx(2 / 3, abs=0.05)


def fast_settings(**kw):
    base = dict(warmup_runs=1, warmup_s=0.0, min_runs=5, max_runs=30, budget_s=1.0)
    return timing.TimingSettings(**{**base, **kw})


def test_no_garbage_collection_inside_a_timed_series():
    seen = []
    timing.measure(lambda: seen.append(gc.isenabled()), (), fast_settings())
    assert seen and not any(seen)
    assert gc.isenabled()


def test_before_call_runs_before_every_call_outside_the_clock():
    """A 20 ms step before each call: every call follows one, and no sample holds it."""
    order = []
    m = timing.measure(
        lambda: order.append("call"), (), fast_settings(max_runs=8, min_runs=8),
        before_call=lambda: (order.append("flush"), time.sleep(0.02)),
    )  # fmt: skip
    assert order == ["flush", "call"] * (len(order) // 2)
    assert m.samples_s.max() < 0.02


def test_a_cold_flush_evicts_what_a_warm_call_finds_in_the_cache():
    """A reduction over a buffer an eighth of the last-level cache: back to back it reads
    the cache; after a flush of twice the cache it reads DRAM, slower (fastest call against
    fastest call, both measured here, now)."""
    from batching.measure import microbench

    dev = jax.devices()[0]
    llc = microbench.last_level_cache_bytes(dev)
    x = jnp.ones((max(llc // 8, 1 << 20) // 4,), jnp.float32)
    call = jax.jit(jnp.sum).lower(x).compile()
    flush = cold.CacheFlush(jax.make_mesh((1,), ("x",)), llc)
    assert flush.bytes_per_device >= 2 * llc
    settings = fast_settings(min_runs=20, max_runs=40, target_rel_ci=1e-6, budget_s=2.0)
    warm = timing.measure(call, (x,), settings).samples_s.min()
    colder = timing.measure(call, (x,), settings, before_call=flush).samples_s.min()
    assert flush.calls >= 20
    assert colder > 1.2 * warm


def test_the_host_window_reads_a_share_or_nothing():
    window = host.Window()
    sum(i * i for i in range(200_000))
    share = window.others_share()
    assert share is None or 0.0 <= share <= 1.0


def test_the_drift_log_keeps_recent_readings_and_reads_their_spread(tmp_path):
    from batching.measure import drift

    key = "cpu:cpu/float32"
    now = 1.0e9
    assert drift.drift(str(tmp_path), key, now) is None  # nothing logged yet
    speeds = [1.0, 1.2, 0.9, 1.1, 1.0]
    for i, v in enumerate(speeds):
        reading = {"matmul_flops_per_s": 2e11 * v, "read_bytes_per_s": 2e10 * v}
        drift.record(str(tmp_path), key, [reading], when=now - 600 * i)
    got = drift.drift(str(tmp_path), key, now)
    assert got.readings == 5 and got.span_s == 2400
    assert got.sd == pytest.approx(np.std(np.log(speeds), ddof=1))
    # A day later those readings say nothing about the machine.
    assert drift.drift(str(tmp_path), key, now + 2 * drift.WINDOW_S) is None


def test_drift_widens_an_interval_in_quadrature_on_a_log_scale():
    lo, hi = pass_stats.with_drift(1.0, math.exp(-0.1), math.exp(0.2), 0.05, 0.95)
    d = 1.959964 * 0.05
    assert math.log(1 / lo) == pytest.approx(math.hypot(0.1, d), rel=1e-5)
    assert math.log(hi) == pytest.approx(math.hypot(0.2, d), rel=1e-5)
    alone = pass_stats.with_drift(1.0, math.nan, math.nan, 0.05, 0.95)
    assert alone == pytest.approx((math.exp(-d), math.exp(d)), rel=1e-5)


def test_the_analysis_adds_the_drift_once_and_keeps_it_when_analysed_elsewhere():
    from batching.measure import drift as drift_lib
    from batching.predict import analysis

    row = {"latency_s": 1e-3, "pass_ci_low_s": 0.9e-3, "pass_ci_high_s": 1.1e-3}
    here = drift_lib.Drift(0.1, 10, 3600.0)
    first = {**row, **analysis.drift_fields(row, here, 0.95)}
    again = {**first, **analysis.drift_fields(first, here, 0.95)}
    elsewhere = {**first, **analysis.drift_fields(first, None, 0.95)}
    assert first["latency_ci_low_s"] < 0.9e-3 and first["latency_ci_high_s"] > 1.1e-3
    assert again["latency_ci_low_s"] == first["latency_ci_low_s"]  # from pass_ci, not twice
    assert elsewhere["latency_ci_high_s"] == first["latency_ci_high_s"]
    assert analysis.drift_fields({"latency_s": 1e-3}, here, 0.95) == {}  # old rows: as stored
