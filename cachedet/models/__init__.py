"""Detector parts after the backbone: necks, heads and the meta-architecture that wires them."""
