"""An ensemble teacher as one model: its distribution is the mean of its members' probabilities
at a temperature T, given as the logits whose softmax at T is exactly that mean, so every
component that reads a teacher's logits at T reads the ensemble's distribution unchanged."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def ensemble_logits(logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """M member logits, each (N, K) -> (N, K) logits z with softmax(z / T) = mean_m softmax(t_m / T)."""
    logp = torch.stack([torch.log_softmax(t.float() / temperature, -1) for t in logits])
    return temperature * (torch.logsumexp(logp, 0) - math.log(len(logits)))


class Ensemble(nn.Module):
    """Members' mean probability at ``temperature``, as logits (``ensemble_logits``): (B, ...) -> (B, K)."""

    def __init__(self, members: Sequence[nn.Module], temperature: float) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_logits([m(x) for m in self.members], self.temperature)
