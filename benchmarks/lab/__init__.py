"""Exploratory scripts: how the defaults were found (forecast_lab: forecast schemes at a fixed
schedule; schedule_sweep: settings side by side; diagnose_schedule: one step forecast alone).
Not the benchmark (benchmarks/run_benchmark.py) and not tests."""
