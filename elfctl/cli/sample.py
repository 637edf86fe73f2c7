"""`elfctl sample` (filled in by the sampler work)."""
