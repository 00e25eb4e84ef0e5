"""Every field of a batching-lab run with a sensible value; model configs override `model`.

python main.py --config=configs/default.py --workdir=/tmp/lab
"""

import os

from ml_collections import config_dict

# The repository's committed sweeps from other machines (batching.outputs.archive).
ARCHIVE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "results")
POWERS_OF_TWO_TO_512 = tuple(2**i for i in range(10))


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    del arg
    config = config_dict.ConfigDict()
    # Name of the experiment; also the run's name when `runs` is empty.
    config.name = "mlp"
    config.seed = 0
    # Platform to run on ("cpu", "gpu", "tpu"); None takes JAX's default backend.
    config.platform = config_dict.placeholder(str)
    # Refuse to reuse a workdir measured under another config unless this is True;
    # the old files are then moved to <workdir>/archive/<time>/, never deleted.
    config.overwrite = False
    # JAX's persistent compilation cache; "" disables it. compile_s then
    # includes loading a cached executable, which is much faster than compiling.
    config.compilation_cache_dir = ""

    # The device mesh: data * expert * model must equal the number of devices JAX sees
    # (all 1: one device, today's single-device runs). Parameters and activations carry
    # logical axis names; axis_rules maps each to a mesh axis or None (replicated), as
    # MaxText's logical_axis_rules do. Names without a rule are replicated. An MoE's routing
    # `groups` are the token shards of every device holding tokens (GShard).
    config.mesh = config_dict.ConfigDict()
    config.mesh.data = 1
    config.mesh.expert = 1
    config.mesh.model = 1
    config.mesh.axis_rules = (
        ("batch", "data"),
        ("groups", ("data", "expert")),
        ("experts", "expert"),
        ("heads", "model"),
        ("kv_heads", "model"),
        ("mlp", "model"),
        ("embed", None),
        ("vocab", None),
        ("layers", None),
        ("capacity", None),
    )

    config.model = config_dict.ConfigDict()
    config.model.name = "mlp"
    config.model.width = 1024
    config.model.depth = 8
    config.model.activation = "relu"
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.model.use_bias = True
    # Vectors per example: each weight is used this many times per example (1: the post's
    # MLP; H·W: a dense stack with a convolution's reuse, claim C6).
    config.model.tokens = 1
    # "default" lets XLA pick (TF32 for fp32 matmuls on A100/H100); "highest" forces fp32.
    config.model.matmul_precision = "default"

    config.sweep = config_dict.ConfigDict()
    config.sweep.batch_sizes = POWERS_OF_TWO_TO_512
    # Visit batch sizes in a random order so slow drift is not read as a trend.
    config.sweep.shuffle = True
    # A pass visits every point once, in a new shuffled order; a point's latency and its
    # interval come from its passes (what moves between passes moves between reruns). Every
    # point gets `passes`; points whose interval misses timing.target_rel_ci get more, one
    # round at a time, until timing.run_budget_s is spent or they have `max_passes`.
    config.sweep.passes = 6
    config.sweep.max_passes = 40

    # The plan every pass of a point follows (batching.measure.timing.RunTiming): warm-up,
    # then at least min_runs calls, until the pass's own median is known to ±target_rel_ci or
    # pass_s seconds have gone (at most max_runs calls).
    config.timing = config_dict.ConfigDict()
    config.timing.warmup_runs = 1
    config.timing.warmup_s = 0.01
    config.timing.min_runs = 3
    config.timing.max_runs = 1000
    config.timing.pass_s = 0.03
    # A point is converged once the 95% interval of its latency, from the spread between its
    # passes, is within ±3%; passes beyond sweep.passes stop when the run has spent this long.
    config.timing.target_rel_ci = 0.03
    config.timing.confidence = 0.95
    config.timing.run_budget_s = 20.0
    # The latency from the pass medians: "geomean", "median" or "trimmed" (pass_stats).
    config.timing.estimator = "geomean"
    # "warm": calls back to back (weights that fit the last-level cache stay there); "cold":
    # the cache evicted before each call, outside the clock (weights come from DRAM).
    config.timing.cache = "warm"
    # Passes of a point further apart than this (std / mean of their medians) mark the
    # machine as noisy in the report (pyperf warns at 10%).
    config.timing.max_pass_cv = 0.10

    # Runs of an experiment: run name -> nested overrides of the fields above.
    # Empty means one run called `name`.
    config.runs = config_dict.ConfigDict()

    config.roofline = config_dict.ConfigDict()
    config.roofline.enabled = True
    # Measured device peaks are cached here per device; refresh re-measures them.
    config.roofline.peaks_cache_dir = "~/.cache/batching_lab"
    config.roofline.refresh_peaks = False
    # Before using cached peaks, measure the matmul peak and the stream again briefly (about a
    # second): a cache filled while the machine was busy is measured again (its per-shape
    # rates too) when this run's check reads more than 25% faster (peaks.check_cached).
    config.roofline.check_peaks = True
    # Compute time from matmuls measured at the model's own shapes (True) or one square peak.
    config.roofline.shape_aware = True
    # Seconds each run's per-shape microbenchmarks may take (GEMM, conv, attention rates);
    # beyond it rates are interpolated between measured shapes. Unset: no limit on a CPU,
    # 45 s on an accelerator (batching.measure.rates.ACCELERATOR_BUDGET_S); 0: measure none.
    config.roofline.microbenchmark_budget_s = config_dict.placeholder(float)
    # Analyse with the peaks in this file (a workdir's device_peaks.json, e.g. from a rented
    # GPU) instead of measuring: rows measured elsewhere re-analysed here. Unset: measure.
    config.roofline.peaks_file = config_dict.placeholder(str)
    # Spec-table devices whose predicted curves are drawn next to the measured one.
    config.roofline.whatif_devices = ("T4", "A100 80GB SXM", "H100 SXM")
    # Replicates of the resampling over passes behind the knee's interval (and other
    # statistics of several points): enough for stable 2.5% and 97.5% tails.
    config.roofline.bootstrap = 2000
    config.roofline.free_batching_alpha = 0.01
    # XLA's counted FLOPs/bytes further than this from the analytic ones get flagged.
    config.roofline.cost_tolerance = 0.10

    # jax.profiler traces of these batch sizes, captured after their timing, into the run's
    # TensorBoard folder (Profile tab; needs the `profile` extra).
    config.profile = config_dict.ConfigDict()
    config.profile.batch_sizes = ()
    config.profile.steps = 3

    # Claims of the post (batching.predict.claims.CLAIMS) this config's report judges.
    config.report = config_dict.ConfigDict()
    config.report.claims = ()
    # Sweeps of the same experiment committed from other machines (experiments/results/
    # <device>/<workdir>/), shown beside this run's as archived measurements; "" turns it off.
    config.report.archive_dir = ARCHIVE_DIR

    # The memory wall: a point whose compiled program needs more than max_bytes (if set)
    # or max_fraction of the device's memory is recorded as status "skipped_memory", not run.
    config.memory = config_dict.ConfigDict()
    config.memory.max_fraction = 0.9
    config.memory.max_bytes = config_dict.placeholder(int)

    # Many processes (one per host, same command and config on each): jax.distributed's
    # coordinator (process 0's host:port), the number of processes and this one's index.
    # All unset: one process. coordinator_address="auto" lets JAX read the unset ones from
    # the cluster's environment (Slurm, Open MPI, Cloud TPU, Kubernetes).
    config.distributed = config_dict.ConfigDict()
    config.distributed.coordinator_address = config_dict.placeholder(str)
    config.distributed.num_processes = config_dict.placeholder(int)
    config.distributed.process_id = config_dict.placeholder(int)
    # Seconds to wait for every process to join; seconds without a heartbeat after which
    # the coordinator declares a process dead and stops the others (JAX's defaults).
    config.distributed.initialization_timeout_s = 300
    config.distributed.heartbeat_timeout_s = 100

    config.output = config_dict.ConfigDict()
    config.output.progress_bar = True
    config.output.plots = True
    return config
