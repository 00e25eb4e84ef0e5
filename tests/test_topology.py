"""The run's Topology on this process's devices (multi-device checks: tests/test_mesh.py)."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from batching import app
from batching.setup import runs, topology
from configs import default


def test_one_device_mesh_is_the_default():
    config = default.get_config()
    topo = topology.build(config)
    assert topo.shape == {"data": 1, "expert": 1, "model": 1}
    assert topo.num_devices == 1 and topo.process_count == 1
    assert topo.device == jax.devices()[0]
    # Nothing is split on one device, so every placement is the plain replicated one.
    assert topo.spec(("batch", "embed")) == P()
    assert topo.token_shards == 1 and topo.expert_shards == 1


def test_rules_map_logical_names_first_rule_wins():
    shape = {"data": 2, "expert": 4, "model": 1}
    rules = topology.axis_rules(default.get_config())
    assert topology.split_size(shape, rules, "groups") == 8  # data x expert
    assert topology.split_size(shape, rules, "experts") == 4
    assert topology.split_size(shape, rules, "embed") == 1
    assert topology.split_size(shape, (("batch", None), ("batch", "data")), "batch") == 1


@pytest.mark.parametrize(
    "field, value, names",
    [
        ("data", 0, "mesh.data"),
        ("model", -2, "mesh.model"),
        ("axis_rules", (("batch", "rows"),), "mesh.axis_rules"),
    ],
)
def test_bad_mesh_fields_name_the_field(field, value, names):
    config = default.get_config()
    config.mesh[field] = value
    with pytest.raises(runs.ConfigError, match=names):
        app.validate(config)


def test_one_device_fingerprint_ignores_the_rules():
    # On one device the rules place nothing, so runs measured before meshes resume.
    config = default.get_config()
    other = default.get_config()
    other.mesh.axis_rules = (("batch", None),)
    views = [runs.measurement_view(runs.expand(c)[0]) for c in (config, other)]
    assert views[0] == views[1] and "mesh" not in views[0]
