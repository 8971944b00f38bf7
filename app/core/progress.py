"""What a training run reports as it goes: metric points and its position in the budget (torch-free,
so the engine produces them and the run repository stores them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Point:
    step: int
    epoch: float
    name: str
    value: float


@dataclass
class Progress:
    step: int
    epoch: int  # completed epochs
    samples: int
