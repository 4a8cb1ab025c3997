"""What pruning reports: worker counters and snapshots, the API server's collector, profiling sections."""
