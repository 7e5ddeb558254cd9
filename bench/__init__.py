"""Benchmarks, one script per question, run as `python -m bench.<name>`; records go to bench/results/.

The scripts arrive with the issues that measure something (GPU throughput, batching, ONNX, the PetS figures).
"""
