"""Benchmarks of the fused op against its GEMM floor and the libraries it replaces."""
