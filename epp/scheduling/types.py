"""The scheduler's plugin interfaces and per-request values.

A scheduling cycle sees an immutable list of :class:`EndpointView` (the datastore
snapshot, after the subset hint) and one :class:`LLMRequest`. Plugins are small
classes, one file each under ``epp.scheduling.plugins``:

* :class:`Filter` narrows the candidates; :class:`Scorer` returns one score per
  candidate (clamped to [0, 1] by the runner, then multiplied by the profile's
  weight and summed); :class:`Picker` orders the winners (primary first).
* :class:`ProfileHandler` decides which profiles run (``pick`` is called until it
  returns nothing) and which result is primary (``process_results``).
* :class:`Decider` answers the P/D question for the disagg profile handler.
* :class:`Producer` computes per-request data before the profiles run (prefix
  match info, token counts) and stores it in the :class:`CycleState`;
  :class:`PrepareData` is its async counterpart (awaited by the director first).
* Hooks used by request control: :class:`PreRequest` (after scheduling, sets
  upstream headers, learns), :class:`ResponseHeaders` (client response headers),
  :class:`ResponseComplete` (once per request, when the response ends).

Scores are lists aligned with the candidate list, which keeps the hot path free
of per-endpoint dicts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

from epp.config import PluginKind
from epp.datastore import EndpointView

if TYPE_CHECKING:
    from epp.config import Params
    from epp.scheduling.registry import BuildContext

#: Characters per token when no tokenizer count is available (llm-d's estimate).
CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class LLMRequest:
    """What the scheduler knows about one inference request."""

    request_id: str
    #: The ``model`` field of the body (the target model; a LoRA adapter name or the base).
    model: str
    #: The prompt text used for prefix matching (chat: serialized messages).
    prompt: str = ""
    #: API kind: ``chat/completions``, ``completions``, ``responses`` or ``embeddings``.
    api: str = "completions"
    headers: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    #: Prompt tokens from a tokenizer, when some producer computed them.
    prompt_tokens: int | None = None
    #: vLLM ``cache_salt`` (separates prefix-cache namespaces).
    cache_salt: str = ""
    #: Token ids of the prompt, when a tokenizing producer computed them.
    token_ids: list[int] | None = None
    #: The parsed JSON body (read-only by convention: messages, prompt, tools...).
    body: Mapping[str, Any] | None = None

    @property
    def estimated_prompt_tokens(self) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return (len(self.prompt) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


@dataclass(slots=True)
class PrefixMatchInfo:
    """Prefix-cache match of one request, as a producer computed it."""

    #: Blocks the request's prompt was cut into (after truncation).
    total_blocks: int
    #: Tokens per block (for the uncached-token estimate of the P/D decider).
    block_tokens: int
    #: Blocks matched per endpoint key (absent key = 0).
    matches: dict[str, int]
    #: The hashes, so the producer can learn from the pick without rehashing.
    hashes: Sequence[int] = ()
    #: Characters per block when the producer cut the prompt text (0: it cut tokens).
    block_chars: int = 0

    def cached_tokens(self, endpoint: str, prompt_tokens: int) -> int:
        return min(prompt_tokens, self.matches.get(endpoint, 0) * self.block_tokens)

    def cached_chars(self, endpoint: str, prompt_chars: int) -> int:
        """Prompt characters covered by ``endpoint``'s matched blocks."""
        per_block = self.block_chars or self.block_tokens * CHARS_PER_TOKEN
        return min(prompt_chars, self.matches.get(endpoint, 0) * per_block)


class CycleState:
    """Per-request scratch space shared by the plugins of one scheduling cycle."""

    __slots__ = ("prefix_match", "rejections", "values")

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        #: The first prefix-match producer's result (what the P/D decider reads).
        self.prefix_match: PrefixMatchInfo | None = None
        #: Why profiles came up empty, for the error message: profile -> reason.
        self.rejections: dict[str, str] = {}

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def put(self, key: str, value: Any) -> None:
        self.values[key] = value


@dataclass(slots=True)
class ProfileRunResult:
    """The picker's choice for one profile: targets ordered best first."""

    targets: list[EndpointView]
    #: Total weighted score per chosen target (same order as ``targets``).
    scores: list[float] = field(default_factory=list)


@dataclass(slots=True)
class SchedulingResult:
    #: Every profile that ran; None for one that found no endpoint.
    profile_results: dict[str, ProfileRunResult | None]
    primary_profile: str

    @property
    def primary(self) -> ProfileRunResult:
        r = self.profile_results[self.primary_profile]
        assert r is not None
        return r

    def targets(self, profile: str) -> list[EndpointView]:
        r = self.profile_results.get(profile)
        return [] if r is None else r.targets


class Plugin(ABC):
    """Every plugin has a registered ``type_name`` and a configured ``name``."""

    type_name: ClassVar[str]
    kind: ClassVar[PluginKind]
    #: True when the plugin needs response bodies (usage) routed through the EPP.
    needs_response_body: ClassVar[bool] = False
    #: True when the plugin needs the response phase at all (the request's end, the
    #: served endpoint, the status). When no configured plugin does, the gateway can
    #: skip sending response headers to the EPP: one ext_proc round trip fewer per
    #: request (see ``Pipeline.needs_response_phase``).
    needs_response_phase: ClassVar[bool] = False

    name: str

    @classmethod
    @abstractmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        """Build from validated parameters; call ``params.finish()`` at the end."""


class Filter(Plugin):
    kind = PluginKind.FILTER

    @abstractmethod
    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> list[EndpointView]: ...


class Scorer(Plugin):
    kind = PluginKind.SCORER
    #: True when ``score`` only ever returns numbers in [0, 1] (never NaN): the
    #: runner then adds them without clamping. Leave False unless the formula
    #: guarantees it for every input (metrics included).
    unit_scores: ClassVar[bool] = False

    @abstractmethod
    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        """One score per endpoint, same order; the runner clamps to [0, 1]."""


class Picker(Plugin):
    kind = PluginKind.PICKER

    @abstractmethod
    def pick(
        self,
        cycle: CycleState,
        request: LLMRequest,
        endpoints: list[EndpointView],
        scores: list[float],
    ) -> ProfileRunResult: ...


class Decider(Plugin):
    kind = PluginKind.DECIDER

    @abstractmethod
    def disaggregate(
        self, cycle: CycleState, request: LLMRequest, decode: EndpointView
    ) -> tuple[bool, str]:
        """(run prefill?, reason label for the metrics)."""


class Producer(Plugin):
    kind = PluginKind.PRODUCER

    @abstractmethod
    def produce(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> None: ...


class PrepareData(ABC):
    """Hook: async per-request preparation before scheduling (e.g. tokenization).

    The director awaits every ``prepare_data`` (bounded by a timeout) before the
    scheduler runs; results go into ``cycle`` or onto ``request`` (``token_ids``,
    ``prompt_tokens``). Must never raise for bad input: leave the data absent.
    """

    @abstractmethod
    async def prepare_data(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> None: ...


class PrefixMatchProducer(Producer):
    """A producer whose result is a :class:`PrefixMatchInfo` in ``cycle.values[name]``."""

    def match_info(self, cycle: CycleState) -> PrefixMatchInfo | None:
        v = cycle.values.get(self.name)
        return v if isinstance(v, PrefixMatchInfo) else None

    def publish(self, cycle: CycleState, info: PrefixMatchInfo) -> None:
        """Store ``info`` under this producer's name; the first producer's is also
        ``cycle.prefix_match`` (what the P/D decider reads)."""
        cycle.values[self.name] = info
        if cycle.prefix_match is None:
            cycle.prefix_match = info

    def hashed_match_info(self, cycle: CycleState) -> PrefixMatchInfo | None:
        """This cycle's match info when it has block hashes to learn, else None."""
        info = self.match_info(cycle)
        return info if info is not None and info.hashes else None


class SaturationDetector(Plugin):
    kind = PluginKind.SATURATION_DETECTOR

    @abstractmethod
    def saturation(self, endpoints: Sequence[EndpointView]) -> float:
        """Pool saturation; >= 1.0 means saturated."""


class PreRequest(ABC):
    """Hook: after scheduling, before the request is forwarded."""

    @abstractmethod
    def pre_request(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        headers: dict[str, str],
    ) -> None:
        """May add upstream headers to ``headers`` (lower-case names)."""


class ResponseHeaders(ABC):
    """Hook: response headers for the client."""

    @abstractmethod
    def response_headers(
        self, cycle: CycleState, request: LLMRequest, result: SchedulingResult, served: str | None
    ) -> Mapping[str, str]: ...

    def routing_response_headers(
        self, cycle: CycleState, request: LLMRequest, result: SchedulingResult
    ) -> Mapping[str, str]:
        """The same headers as far as they are known at routing time (the primary as
        the served endpoint). They travel in the ``envoy.lb`` routing metadata, from
        which pdroute's gateway adds them to the response
        (``pdroute.protocol.headers.RESPONSE_HEADERS_FROM_METADATA``), so they need
        no response round trip. Default: none."""
        return {}


class ResponseComplete(ABC):
    """Hook: called once when the response ends (completed, failed or cancelled)."""

    @abstractmethod
    def response_complete(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        served: str | None,
        status: int | None,
    ) -> None: ...


class ProfileHandler(Plugin):
    kind = PluginKind.PROFILE_HANDLER

    @abstractmethod
    def pick(
        self,
        cycle: CycleState,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfileLike],
        results: Mapping[str, ProfileRunResult | None],
    ) -> list[str]:
        """Names of the profiles to run next; empty when done."""

    @abstractmethod
    def process_results(
        self, cycle: CycleState, request: LLMRequest, results: dict[str, ProfileRunResult | None]
    ) -> SchedulingResult:
        """Choose the primary profile; raise NoReadyEndpoint when there is none."""

    def validate_profiles(self, profiles: Sequence[str], ctx: BuildContext) -> None:
        """Check the configured profile names (raise ConfigError); default accepts all."""


class SchedulerProfileLike(ABC):
    name: str
