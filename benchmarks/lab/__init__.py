"""Exploratory scripts: how the defaults were found (forecast_lab: forecast schemes at a fixed
schedule; schedule_sweep: settings side by side; diagnose_schedule: one step forecast alone),
what a step costs (step_cost), and what the planned targets' choices are worth (budget_trade:
full calls traded for cond-only calls; plan_oracle: every placement of a target's calls;
plan_exponents: the planner's error model with other exponents). Not the benchmark
(benchmarks/run_benchmark.py) and not tests."""
