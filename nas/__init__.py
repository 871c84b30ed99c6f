"""Running experiments: data, training, evaluation, latency, studies, Pareto tables and the CLI.

Files, devices, Optuna and progress bars live here, not in `space` or `pruning`.
"""
