"""The triage priority: which probabilities make an image ``urgent``, ``high`` or ``routine``.

The mapping is configuration (``[triage]``), the thresholds default to the model card's:

* ``triage.priorities`` maps a class to the priority it raises an image to when its probability
  reaches its threshold, e.g. ``{covid19 = "urgent", pneumonia = "high"}``.  Empty (the
  default) means the card's own rule: every thresholded class makes an image ``urgent``.
* ``triage.thresholds`` overrides the card's threshold of a class (``{pneumonia = 0.6}``).

An image gets the highest priority among the classes over their thresholds (inclusive, as the
card's ``triage_rule`` says), else ``routine``.  The same word is stored in the database, coded in
the Structured Report, and sent in HL7 (OBR-5/TQ1-9, HL7 table 0027) and FHIR: every consumer
sees one priority.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from worker.modelcard import ModelCard, ModelCardError, Triage

#: Priorities from most to least urgent; ``routine`` is what no rule fired gives.
PRIORITIES: tuple[str, ...] = ("urgent", "high", "routine")
ROUTINE = "routine"


@dataclass(frozen=True)
class PriorityMap:
    """Class -> (priority, threshold) rules, checked against a model card."""

    rules: Mapping[str, tuple[str, float]]
    #: True when the rules are the card's own (``triage.priorities`` empty).
    card_rule: bool = True

    @classmethod
    def build(
        cls,
        card: ModelCard,
        priorities: Mapping[str, str] | None = None,
        thresholds: Mapping[str, float] | None = None,
    ) -> PriorityMap:
        """The rules for ``card`` with the ``[triage]`` settings applied.

        Raises :class:`ModelCardError` (stopping the node at start-up) when a setting names a
        class the model does not have, or a class has a priority but no threshold anywhere.
        """
        priorities = dict(priorities or {})
        overrides = dict(thresholds or {})
        for what, names in (("triage.priorities", priorities), ("triage.thresholds", overrides)):
            unknown = [c for c in names if c not in card.classes]
            if unknown:
                raise ModelCardError(f"{what} names {unknown}, not classes of model {card.name} ({list(card.classes)})")
        for c, p in priorities.items():
            if p not in PRIORITIES:
                raise ModelCardError(f"triage.priorities.{c} must be one of {PRIORITIES}, got {p!r}")
        merged = {**dict(card.thresholds), **overrides}
        card_rule = not priorities
        if not priorities:
            priorities = {c: "urgent" for c in merged}
        rules: dict[str, tuple[str, float]] = {}
        for c in [c for c in card.classes if c in priorities]:  # card class order: reasons read alike
            p = priorities[c]
            if p == ROUTINE:
                continue
            if c not in merged:
                raise ModelCardError(
                    f"triage.priorities.{c}: class {c!r} has no threshold in the model card; set triage.thresholds.{c}"
                )
            rules[c] = (p, float(merged[c]))
        return cls(MappingProxyType(rules), card_rule)

    @property
    def thresholds(self) -> dict[str, float]:
        """The threshold in force per class with a rule (for the SR, messages and the web page)."""
        return {c: t for c, (_, t) in self.rules.items()}

    def decide(self, probabilities: Mapping[str, float]) -> Triage:
        """The priority of one image and why (e.g. ``"P(covid19)=0.91 >= 0.36 -> urgent"``).

        A class with a rule missing from ``probabilities``, or a non-finite probability, raises
        ``ValueError``: calling such an image routine would hide a wiring bug.
        """
        if not self.rules:
            return Triage(ROUTINE, "no thresholds in model card" if self.card_rule else "no triage.priorities rule")
        fired: list[tuple[int, str]] = []
        for c, (prio, thr) in self.rules.items():
            if c not in probabilities:
                raise ValueError(f"triage: no probability for thresholded class {c!r} (got {sorted(probabilities)})")
            p = float(probabilities[c])
            if not math.isfinite(p):
                raise ValueError(f"triage: P({c}) is not finite ({p!r})")
            if p >= thr:
                fired.append((PRIORITIES.index(prio), f"P({c})={p:.2f} >= {thr:.2f}"))
        if not fired:
            return Triage(ROUTINE, "no class over its threshold")
        best = min(rank for rank, _ in fired)
        return Triage(PRIORITIES[best], "; ".join(text for _, text in fired))

    def describe(self) -> list[str]:
        """One line per rule, most urgent first, for people (status, the model card page)."""
        order = sorted(self.rules.items(), key=lambda kv: PRIORITIES.index(kv[1][0]))
        return [f"{p}: P({c}) >= {t:.3f}" for c, (p, t) in order] + [f"{ROUTINE}: otherwise"]
