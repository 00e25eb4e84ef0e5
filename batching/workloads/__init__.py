"""What the sweep times, the second floor.

Each model family has one module. It binds a model to its inputs and its analytic cost. That
cost is a list of ops (batching.workloads.ops). Some families need a step first. Training,
its text data and its checkpoints live here too.
"""
