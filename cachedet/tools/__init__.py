"""Tools around the three stages: the demo, the compute-savings bench, model-info and export."""
