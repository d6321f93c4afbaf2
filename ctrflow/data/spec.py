"""The feature spec: one declaration of every field a model may see.

Every model, the encoder, the Feast repo and the service read this one object, so adding a field is one
line here, not an edit in five places.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path


class FieldKind(str, Enum):
    CATEGORICAL = "categorical"  # one token id per row
    NUMERIC = "numeric"  # a float, bucketised into tokens by the encoder
    SEQUENCE = "sequence"  # a variable-length list of token ids (padded with 0)
    EMBEDDING = "embedding"  # a dense float vector per row


class Entity(str, Enum):
    USER = "user"
    ITEM = "item"
    CONTEXT = "context"  # belongs to the event itself (scenario, ids)


@dataclass(frozen=True)
class FieldSpec:
    """One model input.

    `column` is the column of the training frame that holds the raw value; `vocab_of` lets a sequence share
    a vocabulary with a categorical field (the behaviour sequence shares the item-id vocabulary).
    """

    name: str
    kind: FieldKind
    entity: Entity
    column: str = ""
    max_len: int = 0  # SEQUENCE: longest kept (the most recent `max_len` values)
    dim: int = 0  # EMBEDDING: vector length
    buckets: int = 0  # NUMERIC: number of quantile buckets
    vocab_of: str = ""  # SEQUENCE: name of the field whose vocabulary it shares
    large: bool = False  # a high-cardinality id field (sampled softmax, sparse gradients)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FieldKind(self.kind))
        object.__setattr__(self, "entity", Entity(self.entity))
        if not self.column:
            object.__setattr__(self, "column", self.name)
        if self.kind is FieldKind.SEQUENCE and self.max_len <= 0:
            raise ValueError(f"field '{self.name}': a sequence needs max_len > 0")
        if self.kind is FieldKind.EMBEDDING and self.dim <= 0:
            raise ValueError(f"field '{self.name}': an embedding needs dim > 0")
        if self.kind is FieldKind.NUMERIC and self.buckets <= 1:
            raise ValueError(f"field '{self.name}': a numeric field needs buckets > 1")


@dataclass
class FeatureSpec:
    """All fields of one dataset, plus the label, scenario and entity keys."""

    fields: list[FieldSpec]
    scenarios: list[str]
    label: str = "label"
    scenario_field: str = "scenario"
    user_key: str = "user_id"
    item_key: str = "item_id"
    timestamp: str = "event_timestamp"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature spec: duplicate field names {dupes}")
        for f in self.fields:
            if f.vocab_of and f.vocab_of not in names:
                raise ValueError(f"field '{f.name}': vocab_of='{f.vocab_of}' is not a field")

    def __getitem__(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field '{name}' in the feature spec (fields: {[f.name for f in self.fields]})")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def of_kind(self, *kinds: FieldKind) -> list[FieldSpec]:
        return [f for f in self.fields if f.kind in kinds]

    def of_entity(self, entity: Entity | str) -> list[FieldSpec]:
        return [f for f in self.fields if f.entity is Entity(entity)]

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in d["fields"]:
            f["kind"] = FieldKind(f["kind"]).value
            f["entity"] = Entity(f["entity"]).value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        d = dict(d)
        d["fields"] = [FieldSpec(**f) for f in d["fields"]]
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))
