"""Many runs planned and measured: benchmarks of a step, plans of a run's time and compute, sweeps."""
