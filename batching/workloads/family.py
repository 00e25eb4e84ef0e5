"""A model family: the declared thing a run's `model` section names.

A family builds a run's workload, checks its own config fields, and may have a step before
timing (training), an attention over a KV cache, or run-level checks. It is found by an
import path, "pkg.mod:attr". The lab's own families are registered by the same kind of path
(FAMILIES). A family outside the package is the same kind of thing as the lab's.

A run picks its family in one of two ways.

- `model.name` names one of the lab's families.
- `model.factory` is the import path of a Family, or of a function `make(model_cfg)` that
  returns `(model, inputs)` (batching.workloads.user wraps it).
"""

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Family:
    """What the sweep needs of a model family, each part declared.

    - `build(run_cfg, topo, workdir)` returns the run's Workload on its mesh.
    - `validate(model_cfg)` raises a ValueError naming a bad model.<field>.
    - `fields`: the model fields the family owns that a config need not set, with their
      defaults. `--config.model.<field>` overrides them, checked by their defaults' types.
    - `validate_run(run_cfg)` checks fields outside `model` the family depends on.
    - `prepare(run_cfg, run_name, workdir, log)` runs before timing and returns its
      summary fields (training).
    - `attend`: the attention over a KV cache the family's model runs, for its
      microbenchmark.
    """

    name: str
    build: Callable[..., Any]
    validate: Callable[[ml_collections.ConfigDict], None] = lambda model_cfg: None
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    validate_run: Callable[[ml_collections.ConfigDict], None] | None = None
    prepare: Callable[..., dict[str, Any]] | None = None
    attend: Callable[..., Any] | None = None


def load(path: str, field: str = "model.factory") -> Any:
    """The object at import path "pkg.mod:attr" (or "pkg.mod:obj.attr").

    A path that does not import or names nothing raises a ValueError naming `field`.
    """
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"{field} must be an import path 'pkg.mod:attr', got {path!r}")
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{field}={path!r} does not import: {e}") from None
    except Exception as e:  # noqa: BLE001 - a user's module may raise anything on import
        raise ValueError(f"{field}={path!r} raised on import: {type(e).__name__}: {e}") from None
    found: Any = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ValueError(f"{field}={path!r}: module {module_name!r} has no {attr!r}") from None
    return found


def with_fields(model_cfg: ml_collections.ConfigDict, family: Family) -> None:
    """Adds the family's declared fields that `model_cfg` lacks, at their defaults."""
    with model_cfg.unlocked():
        for key, value in family.fields.items():
            if key not in model_cfg:
                model_cfg[key] = value
