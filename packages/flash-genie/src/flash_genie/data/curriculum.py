"""Progressive training: the crop length as a function of the optimizer step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LengthCurriculum:
    """``stages`` ``[(length, until_step), ...]``: chains are cropped (and, with
    ``padToMaximumNumResidues``, padded) to ``length`` for the steps before ``until_step``,
    then to the next stage's length, and to ``final`` (``maximumNumResidues``) after the
    last. Config key ``lengthCurriculum 128:1000,256:3000``; no stages: always ``final``.
    """

    stages: tuple[tuple[int, int], ...]
    final: int

    def __init__(self, stages: Sequence[tuple[int, int]], final: int):
        object.__setattr__(self, "stages", tuple((int(a), int(b)) for a, b in stages))
        object.__setattr__(self, "final", int(final))
        lengths = [length for length, _ in self.stages]
        steps = [until for _, until in self.stages]
        if lengths != sorted(set(lengths)) or steps != sorted(set(steps)):
            raise ValueError(f"curriculum stages must increase in length and in step: {list(self.stages)}")
        if lengths and lengths[-1] > self.final:
            raise ValueError(f"curriculum length {lengths[-1]} exceeds maximumNumResidues {self.final}")

    def length_at(self, step: int) -> int:
        """The crop length of optimizer step ``step`` (0-based: the step about to run)."""
        for length, until in self.stages:
            if step < until:
                return length
        return self.final

    def switches(self) -> list[tuple[int, int]]:
        """``[(first step, length), ...]`` of every stage, the final one included."""
        out, start = [], 0
        for length, until in self.stages:
            out.append((start, length))
            start = until
        return [*out, (start, self.final)]
