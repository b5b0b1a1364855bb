"""The naive peer: the teacher itself sampled with 2 Euler steps on its own shifted grid (σ = 1, 0.75, 0 at
shift 3), no training. It is what the method must beat to exist (docs/method.md, "What works means").

Two settings, both truthful about cost: without CFG (2 NFE) and with the teacher's CFG (4 NFE).
Generators are twostep.generate.TeacherSampler objects, so `twostep eval` and the demo take them as they are.
"""

from __future__ import annotations

from ..generate import TeacherSampler


class NaiveSampler(TeacherSampler):
    """The teacher, unchanged (the same object and weights), at 2 Euler steps."""

    def __init__(self, teacher, guidance: float = 0.0):
        super().__init__(teacher, steps=2, guidance=guidance)

    def describe(self) -> str:
        return f"naive teacher 2-step, g={self.guidance:g}, {self.nfe} NFE"


def naive_generators(teacher, guidance: float | None = None) -> dict[str, NaiveSampler]:
    """{"naive-2step-nocfg": 2 NFE, "naive-2step-cfg": 4 NFE}. `teacher` is a twostep.model.Teacher; the CFG
    scale defaults to the teacher's own tuned sampling guidance. With a CFG scale of 0 there is no CFG setting
    to offer, and only the no-CFG generator is returned."""
    g = float(teacher.sampling.get("guidance", 0.0) if guidance is None else guidance)
    gens = {"naive-2step-nocfg": NaiveSampler(teacher, 0.0)}
    if g != 0:
        gens["naive-2step-cfg"] = NaiveSampler(teacher, g)
    return gens
