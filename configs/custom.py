"""A model from outside the lab, named by its factory's import path.

    python main.py --config=configs/custom.py --config.model.factory=my_pkg.my_mod:make \
        --workdir=runs/mine [--config.model.<field>=<value> ...]

`make(model_cfg)` returns `(model, inputs)`: an nnx.Module or a function of arrays, and
`inputs(batch_size)` giving its arguments. A Family made by `batching.family(make,
fields={...})` declares fields with defaults, which `--config.model.<field>` then sets.
The factory may also be the config's argument: --config=configs/custom.py:my_pkg.my_mod:make.
docs/your_model.md walks through an example.
"""

import sys

from ml_collections import config_dict

from batching.workloads import family, registry
from configs import default

FLAG = "--config.model.factory"


def factory_on_command_line(argv: list[str]) -> str | None:
    """The factory path given as --config.model.factory=<path> (or as the next argument)."""
    for i, arg in enumerate(argv):
        if arg.startswith(FLAG + "="):
            return arg.split("=", 1)[1]
        if arg == FLAG and i + 1 < len(argv):
            return argv[i + 1]
    return None


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    factory = arg or factory_on_command_line(sys.argv)
    config = default.get_config()
    config.name = "custom"
    config.report.claims = ("C3",)
    config.model = config_dict.ConfigDict()
    config.model.name = "custom"
    config.model.factory = factory or ""
    if factory:
        fam = registry.of(config.model)  # a ValueError names model.factory
        config.model.name = fam.name
        config.name = fam.name
        family.with_fields(config.model, fam)
    return config
