"""From a config to runs: expand `config.runs`, check the fields setup owns, fingerprint.

Everything here runs before anything is written. So bad input leaves the workdir untouched.
Other floors own other fields: timing, claims and each model family's. The app checks those
(batching.app.validate), after calling these checks.
"""

import dataclasses
from typing import Any

import jax
import ml_collections

from batching.setup import specs, topology
from models.dtypes import resolve_dtype

MATMUL_PRECISIONS = ("default", "high", "highest")
# Fields that do not change what a point measures: a rerun may change them and resume.
NOT_MEASUREMENT = (
    "name",
    "overwrite",
    "runs",
    "memory",
    "output",
    "compilation_cache_dir",
    "sweep",
    "roofline",
    "profile",
    "report",
    # Which process this is and how to reach the others.
    # The process count is in the view.
    "distributed",
)


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field and the value."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a config: its name and its config with the run's overrides applied."""

    name: str
    # The base config with the run's overrides applied.
    config: ml_collections.ConfigDict
    # The setting this run is one seed of (train.seeds > 1), else "": the run itself.
    setting: str = ""

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes the run sweeps (`sweep.batch_sizes`), in config order."""
        return tuple(self.config.sweep.batch_sizes)


def expand(config: ml_collections.ConfigDict) -> list[Run]:
    """One Run per entry of `config.runs`, and per seed of a run.

    Without `config.runs`, there is one run named `config.name`. A run with train.seeds > 1
    becomes one run per seed.
    """
    return [seeded for run in _expand_runs(config) for seeded in _seeds(run)]


def _seeds(run: Run) -> list[Run]:
    """The run once per seed (train.seeds): named <run>_seed<i>, with config.seed + i."""
    train = run.config.get("train")
    seeds = train.get("seeds", 1) if train is not None else 1
    if not _positive_int(seeds):
        raise ConfigError(f"train.seeds must be a positive integer, got {seeds!r}{where(run)}")
    if seeds == 1:
        return [run]
    out = []
    for i in range(seeds):
        cfg = run.config.copy_and_resolve_references()
        name = f"{run.name}_seed{i}"
        with cfg.unlocked():
            cfg.seed = run.config.seed + i
            cfg.run_name = name
        out.append(Run(name, cfg, setting=run.name))
    return out


def _expand_runs(config: ml_collections.ConfigDict) -> list[Run]:
    """One Run per entry of `config.runs` (or one run named `config.name`)."""
    base = config.copy_and_resolve_references()
    with base.unlocked():
        overrides = base.runs.to_dict()
        base.runs = ml_collections.ConfigDict()
    if not overrides:
        with base.unlocked():
            base.run_name = config.name
        return [Run(config.name, base)]
    runs = []
    for name, override in overrides.items():
        cfg = base.copy_and_resolve_references()
        with cfg.unlocked():
            model = override.get("model", {})
            if "name" in model and model["name"] != cfg.model.name:
                # A run of another model family replaces the model section.
                # It must not inherit fields that family does not have.
                cfg.model = ml_collections.ConfigDict(model)
                override = {k: v for k, v in override.items() if k != "model"}
            cfg.update(override)
            # A workload that keeps files per run (trained params) finds them by this name.
            cfg.run_name = name
        runs.append(Run(name, cfg))
    return runs


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def where(run: Run) -> str:
    """What an error about one run of several appends: ` (run 'name')`.

    It is "" for the only run.
    """
    return f" (run {run.name!r})" if run.name != run.config.name else ""


def check_fields(run: Run) -> None:
    """Raises a ConfigError on the first bad field that setup owns.

    Those are names, sweep, dtypes, memory, what-if devices and profile. The error names the
    field and its value. It also normalizes `sweep.batch_sizes` to a tuple.
    """
    cfg = run.config
    where_ = where(run)
    if not run.name or not all(c.isalnum() or c in "-_.=" for c in run.name):
        raise ConfigError(f"runs has a bad run name {run.name!r}; use letters, digits, -_.=")
    sizes = _batch_sizes(cfg, where_)
    passes = cfg.sweep.get("passes", 1)
    if not _positive_int(passes):
        raise ConfigError(f"sweep.passes must be a positive integer, got {passes!r}{where_}")
    most = cfg.sweep.get("max_passes", passes)
    if not _positive_int(most) or most < passes:
        raise ConfigError(
            f"sweep.max_passes must be an integer >= sweep.passes, got {most!r}{where_}"
        )
    _check_model_numerics(cfg.model, where_)
    _check_memory(cfg.get("memory"))
    for name in cfg.roofline.whatif_devices:
        if name not in specs.SPECS:
            raise ConfigError(
                f"roofline.whatif_devices has an unknown device {name!r}; "
                f"known: {sorted(specs.SPECS)}"
            )
    if not isinstance(cfg.roofline.bootstrap, int) or cfg.roofline.bootstrap < 0:
        raise ConfigError(f"roofline.bootstrap must be an int >= 0, got {cfg.roofline.bootstrap!r}")
    for b in cfg.profile.batch_sizes:
        if b not in sizes:
            raise ConfigError(f"profile.batch_sizes must be among sweep.batch_sizes, got {b!r}")


def check_placement(run: Run) -> None:
    """Raises a ConfigError when the run cannot be placed.

    Either its platform is missing, or its mesh does not fit. The mesh must fit the devices,
    the batch sizes and the model.
    """
    device(run.config)
    try:
        topology.validate(run.config)
    except topology.MeshError as e:
        raise ConfigError(f"{e}{where(run)}") from None


def _batch_sizes(cfg: ml_collections.ConfigDict, where_: str) -> tuple[int, ...]:
    sizes = cfg.sweep.batch_sizes
    if isinstance(sizes, int) and not isinstance(sizes, bool):
        sizes = (sizes,)
    if not isinstance(sizes, (tuple, list)) or len(sizes) == 0:
        raise ConfigError(f"sweep.batch_sizes must be a non-empty tuple of ints, got {sizes!r}")
    for b in sizes:
        if not _positive_int(b):
            raise ConfigError(f"sweep.batch_sizes must hold positive integers, got {b!r}{where_}")
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"sweep.batch_sizes has a repeated batch size: {tuple(sizes)!r}{where_}")
    with cfg.unlocked():
        cfg.sweep.batch_sizes = tuple(sizes)
    return tuple(sizes)


def _check_model_numerics(model: ml_collections.ConfigDict, where_: str) -> None:
    for field in ("dtype", "param_dtype"):
        if field in model:
            try:
                resolve_dtype(model[field])
            except ValueError:
                raise ConfigError(
                    f"model.{field} is not a known dtype, got {model[field]!r}{where_}"
                ) from None
    if model.get("matmul_precision", "default") not in MATMUL_PRECISIONS:
        raise ConfigError(
            f"model.matmul_precision must be one of {MATMUL_PRECISIONS}, "
            f"got {model.matmul_precision!r}{where_}"
        )


def _check_memory(mem: ml_collections.ConfigDict | None) -> None:
    if mem is None:
        return
    if not 0 < mem.max_fraction <= 1:
        raise ConfigError(f"memory.max_fraction must be in (0, 1], got {mem.max_fraction!r}")
    if mem.max_bytes is not None and not _positive_int(mem.max_bytes):
        raise ConfigError(f"memory.max_bytes must be a positive int, got {mem.max_bytes!r}")


def device(cfg: ml_collections.ConfigDict) -> jax.Device:
    """The first device of the configured platform (JAX's default backend when unset).

    Runs know their devices through batching.setup.topology.Topology. This is checked first.
    """
    try:
        return jax.devices(cfg.platform)[0] if cfg.platform else jax.devices()[0]
    except RuntimeError:
        raise ConfigError(f"platform is not available here, got {cfg.platform!r}") from None


def measurement_view(run: Run) -> dict[str, Any]:
    """The part of a run's config (and the device) that decides its measurements."""
    view = {k: v for k, v in run.config.to_dict().items() if k not in NOT_MEASUREMENT}
    if sum(topology.mesh_shape(run.config).values()) == len(topology.MESH_AXES):
        # A one-device mesh measures the same as no mesh section, so it is left out.
        # Workdirs without a mesh section then resume.
        view.pop("mesh", None)
    if view.get("model", {}).get("tokens") == 1:
        # One token per example measures the same as no `tokens` field, so it is left out.
        view["model"] = {k: v for k, v in view["model"].items() if k != "tokens"}
    dev = device(run.config)
    view["device"] = {"platform": dev.platform, "device_kind": dev.device_kind}
    view["jax_version"] = jax.__version__
    if jax.process_count() > 1:
        # Absent for one process: it adds nothing to single-process fingerprints.
        view["process_count"] = jax.process_count()
    return view
