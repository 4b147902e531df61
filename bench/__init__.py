"""Side-by-side benchmarks: each ``bench_*.py`` prints ratios against a baseline measured in the same run."""
