"""The command-line entry points: thin mains over the engine (`python -m runners.X` or `deepspeed runners/X.py`)."""
