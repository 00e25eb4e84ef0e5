"""Batching under load: a serving loop for the lab's decoders, its load and its metrics.

- `load`: requests with arrival times (open loop, as `vllm bench serve` draws them) and
  lengths; closed-loop users.
- `engine`: a decoder behind fixed slots (prefill, insert, one step over every slot).
- `loop`: the policies that admit requests into slots, on the host clock.
- `metrics`: vLLM's serving metrics from the per-request records.
"""
