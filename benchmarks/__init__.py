"""The benchmark harness (run_benchmark and its peers: baselines, metrics; the Edit Region, U-Net,
sampler and soak benchmarks; the demo) and its committed results (results/). The exploratory
scripts are in lab/; what benchmarks share with the tests is devkit/."""
