"""Benchmarks: measured numbers for the README, run by hand or `make bench`."""
