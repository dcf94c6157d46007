"""The few Kubernetes object shapes pdroute reads, as msgspec structs.

Only the fields we use are declared; everything else in the API server's JSON is
ignored while decoding (msgspec skips unknown fields), so objects stay small no
matter what other controllers write into them. Every field has a default because
watch BOOKMARK events carry objects with nothing but ``metadata.resourceVersion``.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ObjectMeta(msgspec.Struct, omit_defaults=True, rename="camel"):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)
    deletion_timestamp: str | None = None
    generation: int = 0


class PodCondition(msgspec.Struct, omit_defaults=True):
    type: str = ""
    status: str = ""


class PodStatus(msgspec.Struct, omit_defaults=True, rename="camel"):
    phase: str = ""
    pod_ip: str = msgspec.field(default="", name="podIP")
    conditions: list[PodCondition] = msgspec.field(default_factory=list)


class Pod(msgspec.Struct, omit_defaults=True):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    status: PodStatus = msgspec.field(default_factory=PodStatus)


class LabelSelector(msgspec.Struct, omit_defaults=True, rename="camel"):
    match_labels: dict[str, str] = msgspec.field(default_factory=dict)
    #: InferencePool v1 forbids matchExpressions; kept so we can reject it clearly.
    match_expressions: list[Any] = msgspec.field(default_factory=list)


class Port(msgspec.Struct, omit_defaults=True):
    number: int = 0


class InferencePoolSpec(msgspec.Struct, omit_defaults=True, rename="camel"):
    selector: LabelSelector = msgspec.field(default_factory=LabelSelector)
    target_ports: list[Port] = msgspec.field(default_factory=list)
    app_protocol: str = ""


class InferencePool(msgspec.Struct, omit_defaults=True):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: InferencePoolSpec = msgspec.field(default_factory=InferencePoolSpec)


class LeaseSpec(msgspec.Struct, omit_defaults=True, rename="camel"):
    holder_identity: str | None = None
    lease_duration_seconds: int | None = None
    acquire_time: str | None = None
    renew_time: str | None = None
    lease_transitions: int | None = None


class Lease(msgspec.Struct, omit_defaults=True):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: LeaseSpec = msgspec.field(default_factory=LeaseSpec)
    api_version: str = msgspec.field(default="coordination.k8s.io/v1", name="apiVersion")
    kind: str = "Lease"


class ListMeta(msgspec.Struct, omit_defaults=True, rename="camel"):
    resource_version: str = ""
    #: Set when the server paginates (we do not ask it to; rejected if seen).
    continue_: str = msgspec.field(default="", name="continue")


class RawList(msgspec.Struct):
    """A list response whose items are decoded later, by the informer's type."""

    metadata: ListMeta = msgspec.field(default_factory=ListMeta)
    items: list[msgspec.Raw] | None = None


class RawWatchEvent(msgspec.Struct):
    """One line of a watch stream; ``object`` is decoded by the event type."""

    type: str
    object: msgspec.Raw


class Status(msgspec.Struct, omit_defaults=True):
    """The API server's error body (kind: Status)."""

    code: int = 0
    reason: str = ""
    message: str = ""
