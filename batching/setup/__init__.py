"""Run setup, the first floor: a config expanded into runs and checked, the device mesh each
run shards over, the processes of a multi-host run, the datasheet table, and SIGTERM."""
