from hotfleet._proto.hotfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrepareRequest(_message.Message):
    __slots__ = ("rollout_id", "epoch", "release", "force", "rollback_target")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_TARGET_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    epoch: int
    release: _common_pb2.ReleaseManifest
    force: bool
    rollback_target: bool
    def __init__(self, rollout_id: _Optional[str] = ..., epoch: _Optional[int] = ..., release: _Optional[_Union[_common_pb2.ReleaseManifest, _Mapping]] = ..., force: _Optional[bool] = ..., rollback_target: _Optional[bool] = ...) -> None: ...

class PrepareReply(_message.Message):
    __slots__ = ("ok", "errors", "prepare_s", "changes", "warnings", "epoch_seen", "current_release")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    PREPARE_S_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_RELEASE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    errors: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModuleError]
    prepare_s: float
    changes: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModuleChange]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    epoch_seen: int
    current_release: str
    def __init__(self, ok: _Optional[bool] = ..., errors: _Optional[_Iterable[_Union[_common_pb2.ModuleError, _Mapping]]] = ..., prepare_s: _Optional[float] = ..., changes: _Optional[_Iterable[_Union[_common_pb2.ModuleChange, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., epoch_seen: _Optional[int] = ..., current_release: _Optional[str] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ("rollout_id", "epoch", "commit_at")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COMMIT_AT_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    epoch: int
    commit_at: float
    def __init__(self, rollout_id: _Optional[str] = ..., epoch: _Optional[int] = ..., commit_at: _Optional[float] = ...) -> None: ...

class FinishReply(_message.Message):
    __slots__ = ("ok", "errors", "restored", "pause_s", "release", "warnings", "already_finished", "epoch_seen", "finished_at", "drain_timed_out", "still_in_flight", "digest", "armed_ahead_s")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FINISHED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    STILL_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ARMED_AHEAD_S_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    errors: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModuleError]
    restored: bool
    pause_s: float
    release: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    already_finished: bool
    epoch_seen: int
    finished_at: float
    drain_timed_out: bool
    still_in_flight: int
    digest: str
    armed_ahead_s: float
    def __init__(self, ok: _Optional[bool] = ..., errors: _Optional[_Iterable[_Union[_common_pb2.ModuleError, _Mapping]]] = ..., restored: _Optional[bool] = ..., pause_s: _Optional[float] = ..., release: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., already_finished: _Optional[bool] = ..., epoch_seen: _Optional[int] = ..., finished_at: _Optional[float] = ..., drain_timed_out: _Optional[bool] = ..., still_in_flight: _Optional[int] = ..., digest: _Optional[str] = ..., armed_ahead_s: _Optional[float] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("rollout_id", "epoch")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    epoch: int
    def __init__(self, rollout_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("ok", "errors", "dropped", "epoch_seen")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    errors: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModuleError]
    dropped: bool
    epoch_seen: int
    def __init__(self, ok: _Optional[bool] = ..., errors: _Optional[_Iterable[_Union[_common_pb2.ModuleError, _Mapping]]] = ..., dropped: _Optional[bool] = ..., epoch_seen: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("rollout_id", "epoch", "expected_release")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_RELEASE_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    epoch: int
    expected_release: str
    def __init__(self, rollout_id: _Optional[str] = ..., epoch: _Optional[int] = ..., expected_release: _Optional[str] = ...) -> None: ...

class RollbackReply(_message.Message):
    __slots__ = ("ok", "errors", "pause_s", "release", "warnings", "epoch_seen")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    errors: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModuleError]
    pause_s: float
    release: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    epoch_seen: int
    def __init__(self, ok: _Optional[bool] = ..., errors: _Optional[_Iterable[_Union[_common_pb2.ModuleError, _Mapping]]] = ..., pause_s: _Optional[float] = ..., release: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., epoch_seen: _Optional[int] = ...) -> None: ...

class MakePermanentRequest(_message.Message):
    __slots__ = ("rollout_id", "epoch", "release")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    epoch: int
    release: str
    def __init__(self, rollout_id: _Optional[str] = ..., epoch: _Optional[int] = ..., release: _Optional[str] = ...) -> None: ...

class MakePermanentReply(_message.Message):
    __slots__ = ("ok", "errors", "permanent_release", "epoch_seen")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    PERMANENT_RELEASE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    errors: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModuleError]
    permanent_release: str
    epoch_seen: int
    def __init__(self, ok: _Optional[bool] = ..., errors: _Optional[_Iterable[_Union[_common_pb2.ModuleError, _Mapping]]] = ..., permanent_release: _Optional[str] = ..., epoch_seen: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "state", "current_release", "previous_release", "permanent_release", "labels", "epoch_seen", "prepared_rollout")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_RELEASE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_RELEASE_FIELD_NUMBER: _ClassVar[int]
    PERMANENT_RELEASE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    PREPARED_ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: str
    current_release: str
    previous_release: str
    permanent_release: str
    labels: _containers.ScalarMap[str, str]
    epoch_seen: int
    prepared_rollout: str
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[str] = ..., current_release: _Optional[str] = ..., previous_release: _Optional[str] = ..., permanent_release: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., epoch_seen: _Optional[int] = ..., prepared_rollout: _Optional[str] = ...) -> None: ...

class ModuleStatusRequest(_message.Message):
    __slots__ = ("modules",)
    MODULES_FIELD_NUMBER: _ClassVar[int]
    modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, modules: _Optional[_Iterable[str]] = ...) -> None: ...

class ModuleState(_message.Message):
    __slots__ = ("module", "state", "release", "loaded_digest", "disk_digest")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    LOADED_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DISK_DIGEST_FIELD_NUMBER: _ClassVar[int]
    module: str
    state: str
    release: str
    loaded_digest: str
    disk_digest: str
    def __init__(self, module: _Optional[str] = ..., state: _Optional[str] = ..., release: _Optional[str] = ..., loaded_digest: _Optional[str] = ..., disk_digest: _Optional[str] = ...) -> None: ...

class ModuleStatusReply(_message.Message):
    __slots__ = ("modules",)
    MODULES_FIELD_NUMBER: _ClassVar[int]
    modules: _containers.RepeatedCompositeFieldContainer[ModuleState]
    def __init__(self, modules: _Optional[_Iterable[_Union[ModuleState, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("requests", "errors", "latency_bounds_s", "latency_counts", "cpu_s", "rss_bytes", "uncaught", "gauges", "uptime_s", "release", "host_cpu_busy_s", "host_cpu_total_s", "host_cpu_steal_s", "changed_code", "changed_code_active", "changed_code_release")
    class GaugesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BOUNDS_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_COUNTS_FIELD_NUMBER: _ClassVar[int]
    CPU_S_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNCAUGHT_FIELD_NUMBER: _ClassVar[int]
    GAUGES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    HOST_CPU_BUSY_S_FIELD_NUMBER: _ClassVar[int]
    HOST_CPU_TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    HOST_CPU_STEAL_S_FIELD_NUMBER: _ClassVar[int]
    CHANGED_CODE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_CODE_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_CODE_RELEASE_FIELD_NUMBER: _ClassVar[int]
    requests: int
    errors: int
    latency_bounds_s: _containers.RepeatedScalarFieldContainer[float]
    latency_counts: _containers.RepeatedScalarFieldContainer[int]
    cpu_s: float
    rss_bytes: int
    uncaught: int
    gauges: _containers.ScalarMap[str, float]
    uptime_s: float
    release: str
    host_cpu_busy_s: float
    host_cpu_total_s: float
    host_cpu_steal_s: float
    changed_code: _containers.RepeatedCompositeFieldContainer[ChangedFunction]
    changed_code_active: bool
    changed_code_release: str
    def __init__(self, requests: _Optional[int] = ..., errors: _Optional[int] = ..., latency_bounds_s: _Optional[_Iterable[float]] = ..., latency_counts: _Optional[_Iterable[int]] = ..., cpu_s: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., uncaught: _Optional[int] = ..., gauges: _Optional[_Mapping[str, float]] = ..., uptime_s: _Optional[float] = ..., release: _Optional[str] = ..., host_cpu_busy_s: _Optional[float] = ..., host_cpu_total_s: _Optional[float] = ..., host_cpu_steal_s: _Optional[float] = ..., changed_code: _Optional[_Iterable[_Union[ChangedFunction, _Mapping]]] = ..., changed_code_active: _Optional[bool] = ..., changed_code_release: _Optional[str] = ...) -> None: ...

class ChangedFunction(_message.Message):
    __slots__ = ("name", "kind", "calls", "raised", "calls_estimated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    RAISED_FIELD_NUMBER: _ClassVar[int]
    CALLS_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    calls: int
    raised: int
    calls_estimated: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., calls: _Optional[int] = ..., raised: _Optional[int] = ..., calls_estimated: _Optional[bool] = ...) -> None: ...
