from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModuleError(_message.Message):
    __slots__ = ("node", "module", "reason", "detail")
    NODE_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    node: str
    module: str
    reason: str
    detail: str
    def __init__(self, node: _Optional[str] = ..., module: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ModuleEntry(_message.Message):
    __slots__ = ("name", "path", "digest", "is_package", "instruction", "extra_json", "depends")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    IS_PACKAGE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    digest: str
    is_package: bool
    instruction: str
    extra_json: str
    depends: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., digest: _Optional[str] = ..., is_package: _Optional[bool] = ..., instruction: _Optional[str] = ..., extra_json: _Optional[str] = ..., depends: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseManifest(_message.Message):
    __slots__ = ("name", "version", "digest", "modules", "smoke_json", "health_json", "signature", "signer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    SMOKE_JSON_FIELD_NUMBER: _ClassVar[int]
    HEALTH_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    modules: _containers.RepeatedCompositeFieldContainer[ModuleEntry]
    smoke_json: str
    health_json: str
    signature: bytes
    signer: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., modules: _Optional[_Iterable[_Union[ModuleEntry, _Mapping]]] = ..., smoke_json: _Optional[str] = ..., health_json: _Optional[str] = ..., signature: _Optional[bytes] = ..., signer: _Optional[str] = ...) -> None: ...

class ModuleChange(_message.Message):
    __slots__ = ("module", "kind", "detail")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    module: str
    kind: str
    detail: str
    def __init__(self, module: _Optional[str] = ..., kind: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...
