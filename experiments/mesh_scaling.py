"""Data, expert and tensor parallelism on one mesh of 8 devices (a functional simulation).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python main.py --config=experiments/mesh_scaling.py --workdir=/tmp/mesh

Runs, each over all 8 devices (a mesh's product must equal the device count):

- `mlp_dp{1,2,4,8}`: the MLP data-parallel over `mesh.data` = 1, 2, 4, 8 devices at the same
  global batches; the other 8 / data devices sit on the `expert` axis, which nothing in a
  dense MLP maps to, so they hold replicas.
- `decoder_tp{1,2,4}`: the decoder's decode step tensor-parallel over `mesh.model` = 1, 2, 4
  (heads, kv heads, MLP hidden and the KV cache's kv heads split); replicas on `expert` again.
- `moe_{tc,ec}_ep{1,8}`: the MoE decoder's decode step (trained briefly first) for both
  routers, its experts, routing groups and sequences over 8 devices (`ep8`, the MoE
  decoder's own rules: batch -> data x expert, as GShard) or, on the same mesh, with the
  rules mapping `experts` and `groups` to no axis and the batch to `data` (`ep1`: the
  one-device program on every device).

A k-device run is thus the k-way sharded program plus replicas, never a smaller mesh: this
keeps the one rule (product == devices) and shows, in each row's `mesh_shape`, which axes
carry the model. The forced devices share the machine's CPU cores, and the replicas compete
for them too, so the timings show that the programs run and what they communicate (the
compiled collectives), not how accelerators would scale. About 5-10 minutes on 2 cores.
"""

from ml_collections import config_dict

from configs import decoder, default, moe_decoder

DEVICES = 8
MLP_BATCHES = (8, 64, 512)
DECODE_BATCHES = (8, 32, 64)
# ep1: the same mesh, but an MoE's experts and routing groups map to no mesh axis.
NO_EXPERT_PARALLELISM = tuple(
    (name, None) if name in ("experts", "groups") else (name, axes)
    for name, axes in default.get_config().mesh.axis_rules
)
# The dense runs keep the default rules (batch -> data): their unused axes hold replicas.
# The base config is the MoE decoder's, whose rules split the batch over data x expert.
DENSE_RULES = default.get_config().mesh.axis_rules


def mlp_model() -> config_dict.ConfigDict:
    m = default.get_config().model
    m.width = 256
    m.depth = 4
    return m


def decoder_model() -> config_dict.ConfigDict:
    m = decoder.model("decode")
    m.update(
        vocab_size=256, d_model=128, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16,
        mlp_dim=512, max_seq_len=256, cache_len=128,
    )  # fmt: skip
    return m


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    del arg
    config = moe_decoder.get_config()
    config.name = "mesh_scaling"
    # The MoE decoder is trained only so its routing is not that of random weights.
    config.train.steps = 20
    config.train.warmup_steps = 2
    config.train.batch_size = 8
    config.train.seq_len = 32
    config.train.eval_every = 20
    config.train.eval_batches = 1
    config.train.log_every = 20
    config.train.max_text_bytes = 1_000_000
    config.timing.run_budget_s = 3.0
    config.timing.min_runs = 5
    config.roofline.shape_aware = False
    config.report.claims = ()
    runs = {}
    for data in (1, 2, 4, 8):
        runs[f"mlp_dp{data}"] = {
            "model": mlp_model().to_dict(),
            "mesh": {"data": data, "expert": DEVICES // data, "axis_rules": DENSE_RULES},
            "sweep": {"batch_sizes": MLP_BATCHES},
        }
    for model in (1, 2, 4):
        runs[f"decoder_tp{model}"] = {
            "model": decoder_model().to_dict(),
            "mesh": {"model": model, "expert": DEVICES // model, "axis_rules": DENSE_RULES},
            "sweep": {"batch_sizes": DECODE_BATCHES},
        }
    for short, router in (("tc", "token_choice"), ("ec", "expert_choice")):
        for ep, rules in ((1, NO_EXPERT_PARALLELISM), (DEVICES, config.mesh.axis_rules)):
            runs[f"moe_{short}_ep{ep}"] = {
                "model": {"router": router, "n_layers": 2, "cache_len": 64},
                "mesh": {"expert": DEVICES, "axis_rules": rules},
                "sweep": {"batch_sizes": DECODE_BATCHES},
            }
    config.runs = runs
    return config
