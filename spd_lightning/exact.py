"""loss=exact (stub)."""

from torch import nn


class ExactLoss(nn.Module):
    pass
