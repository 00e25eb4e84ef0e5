"""What the sweep times, the second floor: one module per model family binding a model to
its inputs and its analytic cost (a list of ops, batching.workloads.ops), plus what some
families need first (training, its text data and checkpoints)."""
