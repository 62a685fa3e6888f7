"""Lightning Fabric integration."""

from lightning_mics.fabric.strategy import MiCSStrategy

__all__ = ["MiCSStrategy"]
