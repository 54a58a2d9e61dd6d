"""The run contract (stage 2 -> 3): run record, run directory and checksummed checkpoints."""
