"""The post's MLP (depth 8, width 1024) swept over batch sizes 1..512.

    python main.py --config=configs/mlp.py --workdir=/tmp/mlp
    python main.py --config=configs/mlp.py:width=2048 --workdir=/tmp/mlp2048

The argument is a comma-separated list of `field=value` for model fields
(`width=2048,depth=4`); any field can also be set with `--config.model.width=2048`.
"""

import difflib

from ml_collections import config_dict

from configs import default


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = default.get_config()
    config.name = "mlp"
    config.report.claims = ("C3",)
    if arg:
        for item in arg.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"configs/mlp.py argument must be field=value, got {item!r}")
            if key not in config.model:
                close = difflib.get_close_matches(key, list(config.model), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"configs/mlp.py argument: no model field {key!r}{hint}")
            config.model[key] = _parse(key, value, type(config.model[key]))
    return config


def _parse(key: str, value: str, kind: type):
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise ValueError(f"model.{key} must be true or false, got {value!r}")
        return value.lower() == "true"
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"model.{key} must be a {kind.__name__}, got {value!r}") from None
