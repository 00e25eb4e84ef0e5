"""The serving loop, its load and vLLM's metrics: a hand-made trace with known answers,
arrivals as vLLM draws them, and greedy tokens that do not depend on the batch."""

import dataclasses
import functools
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from batching.serve import capacity, load, metrics, session, simulate
from batching.serve.engine import Engine
from batching.serve.loop import IDLE, Loop, prompt_tokens
from models import decoding
from models.decoder import Decoder, DecoderConfig

CFG = DecoderConfig(
    vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
    max_seq_len=64,
)  # fmt: skip
MAX_LEN = 32


def _record(id_, arrival, tokens, prompt_len=4, admitted=None):
    r = metrics.Record(id_, arrival, prompt_len, len(tokens), list(tokens))
    r.admitted_s = arrival if admitted is None else admitted
    return r


def test_metrics_on_a_hand_made_trace_are_vllms():
    records = [
        _record(0, 0.0, [1.0, 1.5, 2.0, 3.0]),  # TTFT 1, E2E 3, TPOT (3-1)/3, ITL .5 .5 1
        _record(1, 1.0, [1.5], admitted=1.2),  # one token: TTFT .5, no TPOT, no ITL
        _record(2, 2.0, [4.0, 5.0]),  # TTFT 2, E2E 3, TPOT 1, ITL 1
    ]
    records.append(metrics.Record(3, 2.5, 4, 3, error="too long"))
    m = metrics.summarize(records, duration_s=5.0, slo_ttft_s=1.0, slo_tpot_s=0.9)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["request_throughput_per_s"] == pytest.approx(3 / 5)
    assert m["output_throughput_per_s"] == pytest.approx(7 / 5)
    assert m["total_token_throughput_per_s"] == pytest.approx((7 + 12) / 5)
    assert m["ttft_mean_s"] == pytest.approx((1 + 0.5 + 2) / 3)
    assert m["ttft_median_s"] == pytest.approx(1.0)
    assert m["ttft_p90_s"] == pytest.approx(np.percentile([1, 0.5, 2], 90))
    assert m["tpot_mean_s"] == pytest.approx((2 / 3 + 1) / 2)  # the one-token request is out
    assert m["itl_mean_s"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)  # pooled over requests
    assert m["e2e_p99_s"] == pytest.approx(np.percentile([3, 0.5, 3], 99))
    assert m["tpot_std_s"] == pytest.approx(np.std([2 / 3, 1]))  # population std, as vLLM
    # good: request 0 (TTFT 1 <= 1, TPOT .67) and 1 (TPOT counts 0); not 2 (TTFT 2)
    assert m["goodput_per_s"] == pytest.approx(2 / 5)
    assert m["queueing_delay_mean_s"] == pytest.approx(0.2 / 3)


def test_arrivals_are_gamma_gaps_at_the_rate_scaled_to_end_at_n_over_rate():
    times = load.arrivals(20000, rate=4.0, seed=1)
    gaps = np.diff(times)
    assert times[-1] == pytest.approx(20000 / 4.0)
    assert np.all(gaps >= 0) and np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.05)
    bursty = np.diff(load.arrivals(20000, rate=4.0, burstiness=0.25, seed=1))
    assert np.std(bursty) / np.mean(bursty) == pytest.approx(2.0, rel=0.05)  # CV = 1/sqrt(k)
    assert np.all(load.arrivals(5, math.inf) == 0)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="serve.request_rate must be > 0"):
            load.arrivals(3, bad)


def test_lengths_and_traces_are_read_or_refused_with_the_field(tmp_path):
    reqs = load.open_loop(50, 10.0, prompt_len=(2, 5), output_len=3, seed=3)
    assert {r.output_len for r in reqs} == {3} and {r.prompt_len for r in reqs} <= {2, 3, 4, 5}
    assert reqs == load.open_loop(50, 10.0, prompt_len=(2, 5), output_len=3, seed=3)
    with pytest.raises(ValueError, match="serve.output_len must be >= 1"):
        load.open_loop(2, 1.0, 4, 0)
    trace = tmp_path / "trace.jsonl"
    lines = [{"arrival_s": 0.5, "prompt_len": 3, "output_len": 2},
             {"arrival_s": 0.1, "prompt_len": 4, "output_len": 1}]  # fmt: skip
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert [(r.id, r.arrival_s, r.prompt_len) for r in load.from_trace(str(trace))] == [
        (0, 0.1, 4), (1, 0.5, 3),
    ]  # fmt: skip
    trace.write_text('{"arrival_s": 0.5, "prompt_len": 3}\n')
    with pytest.raises(ValueError, match="line 1"):
        load.from_trace(str(trace))


@functools.cache
def _model_params():
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(x):
        if x.ndim == 1:
            return (1 + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
        return (rng.standard_normal(x.shape) / np.sqrt(x.shape[0])).astype(x.dtype)

    return graphdef, jax.device_put(jax.tree.map(draw, abstract))


def _model() -> Decoder:
    graphdef, params = _model_params()
    return nnx.merge(graphdef, params, copy=True)


def _alone(request: load.Request) -> list[int]:
    """decoding.generate on the request's prompt, batch 1: the reference tokens."""
    model = _model()
    model.init_cache(1, MAX_LEN)
    graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
    prompt = prompt_tokens(request, CFG.vocab_size)[None]
    lengths = np.array([request.prompt_len], np.int32)
    out, _ = decoding.generate(graphdef, params, cache, prompt, lengths, request.output_len)
    return [int(t) for t in np.asarray(out)[0]]


def test_continuous_batching_serves_each_request_its_own_greedy_tokens():
    # Five requests on two slots: staggered lengths retire at different steps and their
    # slots are reused; one asks more than max_len and is refused with the reason.
    requests = [
        load.Request(0, 0.0, 5, 7), load.Request(1, 0.0, 3, 2), load.Request(2, 0.0, 8, 1),
        load.Request(3, 0.0, 30, 10), load.Request(4, 0.0, 6, 5),
    ]  # fmt: skip
    engine = Engine(_model(), slots=2, max_len=MAX_LEN)
    engine.warm_up([r.prompt_len for r in requests])
    loop = Loop(engine, "continuous")
    records, duration = loop.run(requests)
    assert records[3].error.startswith("prompt 30 + output 10 - 1 > max_len 32")
    for r, rec in zip(requests, records, strict=True):
        if r.id != 3:
            assert rec.ok and rec.tokens == _alone(r), r
            assert np.all(np.diff([rec.admitted_s, *rec.token_s]) >= 0)
    assert max(loop.occupancy) == 2 and duration >= records[0].token_s[-1]
    # static: the second batch starts only when the first has ended
    static = Loop(engine, "static").run([load.Request(0, 0.0, 4, 6), load.Request(1, 0.0, 4, 2),
                                         load.Request(2, 0.0, 4, 2)])[0]  # fmt: skip
    assert static[2].admitted_s >= static[0].token_s[-1]
    assert [rec.tokens for rec in static] == [
        _alone(r)
        for r in (
            load.Request(0, 0.0, 4, 6),
            load.Request(1, 0.0, 4, 2),
            load.Request(2, 0.0, 4, 2),
        )
    ]


def test_the_simulator_runs_the_loops_policies_on_its_costs():
    costs = simulate.Costs(step_s=0.01, insert_s=0.002, prefill_s={8: 0.05})
    # one slot, requests far apart: each waits for nothing
    apart = [load.Request(i, 10.0 * i, 8, 4) for i in range(3)]
    records, duration, _ = simulate.simulate(apart, costs, slots=1, max_len=32, policy="static")
    for r in records:
        assert r.ttft_s == pytest.approx(0.05)  # its prefill
        assert r.tpot_s == pytest.approx(0.002 / 3 + 0.01)  # the insert, then one step a token
    assert duration == pytest.approx(20.0 + 0.05 + 0.002 + 3 * 0.01)
    # two at once on one slot: the second waits for the first's prefill, insert and steps
    both = [load.Request(0, 0.0, 8, 4), load.Request(1, 0.0, 8, 4)]
    records, _, occupancy = simulate.simulate(both, costs, 1, 32, "continuous")
    assert records[1].admitted_s == pytest.approx(0.05 + 0.002 + 3 * 0.01)
    assert records[1].ttft_s == pytest.approx(0.05 + 0.002 + 3 * 0.01 + 0.05)
    assert occupancy == [1] * 6
    # an unmeasured prompt length is scaled from the nearest measured one
    assert costs.prefill(16) == pytest.approx(0.1)


def test_capacity_bisects_to_the_rate_where_p90_ttft_meets_the_slo():
    def queue(rate):  # p90 TTFT of a queue that saturates at 10 requests/s
        ttft = 0.1 / (1 - rate / 10) if rate < 10 else math.inf
        return {"completed": 1, "ttft_p90_s": ttft, "tpot_p90_s": 0.01}

    found = capacity.capacity(queue, slo_ttft_s=1.0, slo_tpot_s=0.05, low=1.0, high=20.0)
    assert 9.0 / 1.05 <= found["capacity_per_s"] <= 9.0 < found["upper_per_s"]
    assert found["upper_per_s"] / found["capacity_per_s"] - 1 <= capacity.REL_TOL
    assert all(v == (r <= 9.0) for r, v in found["tried"])
    assert capacity.capacity(queue, 1.0, 0.05, 12.0, 20.0)["capacity_per_s"] == 0.0
    with pytest.raises(ValueError, match="0 < low < high"):
        capacity.capacity(queue, 1.0, 0.05, 5.0, 5.0)


def test_measured_costs_drive_a_simulation_of_the_real_engine():
    engine = Engine(_model(), slots=2, max_len=MAX_LEN)
    costs = simulate.measure_costs(engine, [5])
    assert costs.step_s > 0 and costs.insert_s > 0 and set(costs.prefill_s) == {8}
    requests = [load.Request(0, 0.0, 5, 6), load.Request(1, 0.0, 5, 3)]
    records, _, occupancy = simulate.simulate(requests, costs, 2, MAX_LEN, "continuous")
    assert occupancy == [2, 2, 1, 1, 1] and all(r.ok for r in records)
    # costs fitted to a real run: one sample per engine call the loop made, and its own time
    # per iteration; a call after the loop slept is filed apart
    loop = Loop(engine, "continuous")
    loop.run([*requests, load.Request(2, 0.3, 5, 2)])
    calls = {k: len(v) for k, v in loop.calls.items()}
    assert calls.pop("host") >= 6 and min(loop.calls["host"]) >= 0
    assert calls == {"prefill:8": 2, "prefill:8" + IDLE: 1, "insert": 3, "step": 6}
    fitted = simulate.costs_from_loop(loop.calls)
    assert fitted.step_s == pytest.approx(np.mean(loop.calls["step"]))
    assert set(fitted.prefill_s) == {8} and fitted.samples["step"] == tuple(loop.calls["step"])


def test_the_simulator_draws_each_call_from_its_samples_and_after_idle_from_those():
    samples = {"step": (0.01, 0.03), "prefill:8": (0.05,), "prefill:8" + IDLE: (0.2,)}
    costs = simulate.Costs(0.02, 0.0, {8: 0.05}, samples=samples)
    # the first arrives at once; the second after the loop slept: its prefill is the idle one
    apart = [load.Request(0, 0.0, 8, 1), load.Request(1, 10.0, 8, 1)]
    records, _, _ = simulate.simulate(apart, costs, 1, 32, "continuous")
    assert [r.ttft_s for r in records] == pytest.approx([0.05, 0.2])
    # steps draw both of their samples, the seed fixing which
    many = [load.Request(0, 0.0, 8, 200)]
    runs = [simulate.simulate(many, costs, 1, 256, "continuous", seed=s)[0][0] for s in (0, 0, 1)]
    gaps = np.diff(runs[0].token_s)
    assert set(np.round(gaps, 6)) == {0.01, 0.03}
    assert runs[0].token_s == runs[1].token_s != runs[2].token_s


def test_a_closed_loop_user_sends_its_next_request_when_its_last_one_ends():
    costs = simulate.Costs(step_s=0.01, insert_s=0.002, prefill_s={8: 0.05})
    clock = simulate.Clock()
    engine = simulate.SimEngine(costs, slots=1, max_len=32, clock=clock)
    users = load.closed_loop(users=2, per_user=3, prompt_len=8, output_len=4)
    records, _ = Loop(engine, "continuous", clock=clock, sleep=clock.sleep).run_closed(users)
    assert [r.id for r in records] == list(range(6)) and all(r.ok for r in records)
    for queue in users:
        mine = [records[r.id] for r in queue]
        assert mine[0].arrival_s == 0.0
        for last, nxt in zip(mine, mine[1:], strict=False):
            assert nxt.arrival_s == pytest.approx(last.token_s[-1])  # one in flight per user
    # one slot, taken in arrival order: user 1's first request waits for user 0's
    assert records[3].admitted_s == pytest.approx(records[0].token_s[-1])


def test_a_quantile_interval_is_the_labs_median_interval_at_one_half():
    from batching.measure import stats

    rng = np.random.default_rng(0)
    for n in (5, 32, 101):
        x = rng.lognormal(size=n)
        assert metrics.quantile_interval(x, 0.5) == stats.median_interval(x)
    x = np.arange(1.0, 101.0)
    low, high = metrics.quantile_interval(x, 0.9)
    assert low < np.percentile(x, 90) < high and {low, high} <= set(x)
    # coverage: the interval holds the true p90 of an exponential about 95% of the time
    true_p90 = -np.log(0.1)
    hits = [
        (lambda lo_hi: lo_hi[0] <= true_p90 <= lo_hi[1])(
            metrics.quantile_interval(rng.exponential(size=60), 0.9)
        )
        for _ in range(400)
    ]
    assert 0.92 <= np.mean(hits) <= 0.995


def test_spec_costs_price_the_decoders_op_lists_at_datasheet_peaks():
    from batching.predict import whatif
    from batching.setup import specs
    from batching.workloads import decoder as decoder_workload

    h100 = simulate.spec_costs(CFG, slots=4, max_len=MAX_LEN, buckets=[8, 16], device="H100 SXM")
    t4 = simulate.spec_costs(CFG, slots=4, max_len=MAX_LEN, buckets=[8, 16], device="T4")
    ops = decoder_workload.step_ops(CFG, 4, MAX_LEN, "decode", 4, 4, CFG.cache_layout)
    rows = [{"batch_size": 4, "ops": [o.to_dict() for o in ops]}]
    assert (
        h100.step_s
        == whatif.whatif(rows, ("H100 SXM",), "float32", "default", 4)["H100 SXM"]["latency_s"][4]
    )
    kv = 2 * CFG.n_layers * MAX_LEN * CFG.n_kv_heads * CFG.head_dim * 4
    assert h100.insert_s == pytest.approx(2 * kv / specs.SPECS["H100 SXM"].bandwidth_bytes_per_s)
    assert h100.prefill_s[8] < h100.prefill_s[16] and t4.step_s > h100.step_s


def test_chunked_prefill_serves_the_same_greedy_tokens_and_never_stalls_a_step():
    # Prompts of 3..21 tokens in chunks of 8 between decode steps: each request gets the
    # tokens it gets alone, and a running request's tokens are never more than one chunk
    # (and one insert) apart.
    requests = [load.Request(0, 0.0, 5, 6), load.Request(1, 0.0, 21, 4),
                load.Request(2, 0.0, 3, 3), load.Request(3, 0.0, 17, 1)]  # fmt: skip
    engine = Engine(_model(), slots=2, max_len=MAX_LEN, chunk=8)
    engine.warm_up([r.prompt_len for r in requests])
    loop = Loop(engine, "chunked")
    records, _ = loop.run(requests)
    for r, rec in zip(requests, records, strict=True):
        assert rec.ok and rec.tokens == _alone(r), r
    # Request 1's 21 tokens took three chunks; one request filled at a time.
    assert len(loop.calls["chunk"]) == sum(-(-r.prompt_len // 8) for r in requests)
    with pytest.raises(ValueError, match="needs serve.chunk_tokens"):
        Loop(Engine(_model(), slots=1, max_len=MAX_LEN), "chunked")
    with pytest.raises(ValueError, match="must divide serve.max_len"):
        Engine(_model(), slots=1, max_len=MAX_LEN, chunk=12)
    costs = simulate.Costs(1e-3, 1e-4, {8: 2e-3}, chunk_s=5e-4)
    sim, _, _ = simulate.simulate(requests, costs, 2, MAX_LEN, "chunked", chunk=8)
    # The simulator runs the same policy: request 1 waits three chunks for its first token.
    assert sim[1].ttft_s >= 3 * 5e-4 + sim[0].ttft_s


def test_an_moe_engine_gives_each_slots_experts_and_each_request_its_drop_fraction():
    cfg = dataclasses.replace(CFG, moe_every=1, num_experts=4, top_k=1, capacity_factor=1.0)
    engine = Engine(Decoder(cfg, rngs=nnx.Rngs(0)), slots=4, max_len=MAX_LEN)
    assert engine.routing == ("token_choice", 1)
    records, _ = Loop(engine, "continuous").run([load.Request(i, 0.0, 4, 5) for i in range(4)])
    for r in records:  # a row per decode step (the first token is the prefill's), one per block
        assert np.shape(r.experts) == (4, 2) and set(np.ravel(r.experts)) <= {0.0, 1.0}
    drops = session.drop_fractions(records, engine.routing)
    assert drops == pytest.approx([1 - np.mean(r.experts) for r in records])
    # by hand: top-2 token-choice loses the assignments short of 2; expert-choice counts the
    # (token, block) pairs no expert picked
    hand = _record(0, 0.0, [1, 2, 3])
    hand.experts = [[2, 0], [1, 1]]
    assert session.drop_fractions([hand], ("token_choice", 2)) == [pytest.approx(0.5)]
    assert session.drop_fractions([hand], ("expert_choice", 2)) == [pytest.approx(0.25)]
    dense = Engine(_model(), slots=2, max_len=MAX_LEN)
    assert dense.routing is None
    assert all(not r.experts for r in Loop(dense, "static").run([load.Request(0, 0.0, 4, 3)])[0])
