"""Configs, the CLI and the evaluation harness: the only layer that knows how runs start."""

import os

# Idle OpenMP threads sleep instead of spinning: with another process on the same cores,
# spinning threads starve each other (a tiny training went from 46 s to over 9 minutes).
# Read when torch loads its OpenMP runtime, so it is set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
