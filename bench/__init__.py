"""Benchmarks of the engine, the server and the kernels; `tristream bench` runs latency, throughput and serving."""
