"""Run setup, the first floor.

A config is expanded into runs and checked here. Each run gets the device mesh it shards
over. A multi-host run gets its processes. The datasheet table and SIGTERM handling live
here too.
"""
