"""The scheduler: plugin interfaces, profile runner, registry and built-in plugins.

Entry point: :func:`build_pipeline` turns an ``EndpointPickerConfig`` into a
:class:`Pipeline` (scheduler + saturation detector + request-control hooks).
"""

from epp.scheduling.registry import BuildContext, plugin_class, register, registered_types
from epp.scheduling.scheduler import Pipeline, Scheduler, SchedulerProfile, build_pipeline
from epp.scheduling.types import (
    CHARS_PER_TOKEN,
    CycleState,
    Decider,
    Filter,
    LLMRequest,
    Picker,
    Plugin,
    PrefixMatchInfo,
    PrefixMatchProducer,
    PrepareData,
    PreRequest,
    Producer,
    ProfileHandler,
    ProfileRunResult,
    ResponseComplete,
    ResponseHeaders,
    SaturationDetector,
    SchedulingResult,
    Scorer,
)

__all__ = [
    "CHARS_PER_TOKEN",
    "BuildContext",
    "CycleState",
    "Decider",
    "Filter",
    "LLMRequest",
    "Picker",
    "Pipeline",
    "Plugin",
    "PreRequest",
    "PrefixMatchInfo",
    "PrefixMatchProducer",
    "PrepareData",
    "Producer",
    "ProfileHandler",
    "ProfileRunResult",
    "ResponseComplete",
    "ResponseHeaders",
    "SaturationDetector",
    "Scheduler",
    "SchedulerProfile",
    "SchedulingResult",
    "Scorer",
    "build_pipeline",
    "plugin_class",
    "register",
    "registered_types",
]
