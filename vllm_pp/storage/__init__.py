"""Files: calibration statistics and per-rank history shards (safetensors + JSON metadata)."""
