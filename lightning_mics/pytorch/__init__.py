"""Lightning Trainer integration."""

from lightning_mics.pytorch.strategy import MiCSStrategy

__all__ = ["MiCSStrategy"]
