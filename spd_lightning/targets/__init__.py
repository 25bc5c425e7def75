"""Target backends: who completes the hybrid prefixes greedily."""

from spd_lightning.targets.base import Target
from spd_lightning.targets.local import LocalTarget

__all__ = ["Target", "LocalTarget"]
