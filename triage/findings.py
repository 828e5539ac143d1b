"""What a model run produces: findings per output label, with the model that made them."""

from __future__ import annotations

from dataclasses import dataclass, field

from triage.priority import PriorityClass


@dataclass(frozen=True)
class CodedConcept:
    """A coded finding (SNOMED CT "SCT" or RadLex "RADLEX") as it appears in the SR."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Finding:
    """One output label of one model on one series.

    ``priority`` is the class the label's threshold implies when ``probability`` reaches it,
    otherwise ``None`` (the label is reported, but raises nothing).
    """

    concept: CodedConcept
    probability: float
    threshold: float
    priority: PriorityClass | None
    key_sop_instance_uid: str
    key_sop_class_uid: str

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class ModelIdentity:
    """Everything the SR and the worklist need to name the algorithm (TID 4019, IHE AIR)."""

    id: str
    version: str
    name: str
    manufacturer: str
    weights_sha256: str
    regulatory_status: str


@dataclass(frozen=True)
class ModelResult:
    """The result of one model on the series it selected in one study."""

    model: ModelIdentity
    series_instance_uid: str
    input_sop_instance_uids: tuple[str, ...]
    findings: tuple[Finding, ...]
    timings: dict[str, float] = field(default_factory=dict)
    # Images whose scores came from the streaming score cache (``triage.streaming``).
    from_cache: int = 0
