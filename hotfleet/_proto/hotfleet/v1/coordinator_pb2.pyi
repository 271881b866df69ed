from hotfleet._proto.hotfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Target(_message.Message):
    __slots__ = ("all", "nodes", "selector")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ALL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    all: bool
    nodes: _containers.RepeatedScalarFieldContainer[str]
    selector: _containers.ScalarMap[str, str]
    def __init__(self, all: _Optional[bool] = ..., nodes: _Optional[_Iterable[str]] = ..., selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RolloutOptions(_message.Message):
    __slots__ = ("dry_run", "allow_missing", "timeout_s", "concurrency", "force", "window_s", "has_window_s", "waves", "health", "allow_downgrade")
    class HealthEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    HAS_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    ALLOW_DOWNGRADE_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    allow_missing: bool
    timeout_s: float
    concurrency: int
    force: bool
    window_s: float
    has_window_s: bool
    waves: _containers.RepeatedScalarFieldContainer[str]
    health: _containers.ScalarMap[str, str]
    allow_downgrade: bool
    def __init__(self, dry_run: _Optional[bool] = ..., allow_missing: _Optional[bool] = ..., timeout_s: _Optional[float] = ..., concurrency: _Optional[int] = ..., force: _Optional[bool] = ..., window_s: _Optional[float] = ..., has_window_s: _Optional[bool] = ..., waves: _Optional[_Iterable[str]] = ..., health: _Optional[_Mapping[str, str]] = ..., allow_downgrade: _Optional[bool] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushReleaseRequest(_message.Message):
    __slots__ = ("release", "sources", "problems", "unpack")
    class SourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    UNPACK_FIELD_NUMBER: _ClassVar[int]
    release: _common_pb2.ReleaseManifest
    sources: _containers.ScalarMap[str, bytes]
    problems: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModuleError]
    unpack: bool
    def __init__(self, release: _Optional[_Union[_common_pb2.ReleaseManifest, _Mapping]] = ..., sources: _Optional[_Mapping[str, bytes]] = ..., problems: _Optional[_Iterable[_Union[_common_pb2.ModuleError, _Mapping]]] = ..., unpack: _Optional[bool] = ...) -> None: ...

class ListReleasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShowReleaseRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class RemoveReleaseRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class UnpackReleaseRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class UpgradeRequest(_message.Message):
    __slots__ = ("ref", "target", "options")
    REF_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ref: str
    target: Target
    options: RolloutOptions
    def __init__(self, ref: _Optional[str] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., options: _Optional[_Union[RolloutOptions, _Mapping]] = ...) -> None: ...

class FleetRollbackRequest(_message.Message):
    __slots__ = ("target", "to_version", "options")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    target: Target
    to_version: str
    options: RolloutOptions
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., to_version: _Optional[str] = ..., options: _Optional[_Union[RolloutOptions, _Mapping]] = ...) -> None: ...

class AbortRolloutRequest(_message.Message):
    __slots__ = ("rollout_id",)
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    def __init__(self, rollout_id: _Optional[str] = ...) -> None: ...

class PromoteRolloutRequest(_message.Message):
    __slots__ = ("rollout_id",)
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    def __init__(self, rollout_id: _Optional[str] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("rollout_id",)
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    def __init__(self, rollout_id: _Optional[str] = ...) -> None: ...

class ListRolloutsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class FleetModulesRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class RecordReply(_message.Message):
    __slots__ = ("record_json", "coordinator", "leader")
    RECORD_JSON_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    record_json: str
    coordinator: str
    leader: bool
    def __init__(self, record_json: _Optional[str] = ..., coordinator: _Optional[str] = ..., leader: _Optional[bool] = ...) -> None: ...

class RecordsReply(_message.Message):
    __slots__ = ("records_json", "coordinator", "leader")
    RECORDS_JSON_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    records_json: _containers.RepeatedScalarFieldContainer[str]
    coordinator: str
    leader: bool
    def __init__(self, records_json: _Optional[_Iterable[str]] = ..., coordinator: _Optional[str] = ..., leader: _Optional[bool] = ...) -> None: ...
