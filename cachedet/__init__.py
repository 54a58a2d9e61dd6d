"""cachedet: train detection heads on cached features of a frozen classification backbone."""

__version__ = "0.1.0"
