"""Names of the dtypes a config may ask for, mapped to JAX dtypes."""

import jax.numpy as jnp

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def resolve_dtype(name: str) -> jnp.dtype:
    """Returns the JAX dtype called `name`; a ValueError names the bad value."""
    try:
        return jnp.dtype(DTYPES[name])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None
