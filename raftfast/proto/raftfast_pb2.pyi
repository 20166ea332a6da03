from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReadMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    READ_DEFAULT: _ClassVar[ReadMode]
    READ_LINEARIZABLE: _ClassVar[ReadMode]
    READ_LEASE: _ClassVar[ReadMode]
    READ_STALE: _ClassVar[ReadMode]
READ_DEFAULT: ReadMode
READ_LINEARIZABLE: ReadMode
READ_LEASE: ReadMode
READ_STALE: ReadMode

class RaftMessage(_message.Message):
    __slots__ = ("type", "src", "dst", "term", "index", "log_term", "entries", "commit", "reject", "hint", "context")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    type: int
    src: str
    dst: str
    term: int
    index: int
    log_term: int
    entries: bytes
    commit: int
    reject: bool
    hint: int
    context: int
    def __init__(self, type: _Optional[int] = ..., src: _Optional[str] = ..., dst: _Optional[str] = ..., term: _Optional[int] = ..., index: _Optional[int] = ..., log_term: _Optional[int] = ..., entries: _Optional[bytes] = ..., commit: _Optional[int] = ..., reject: _Optional[bool] = ..., hint: _Optional[int] = ..., context: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("cluster_id", "src", "messages", "incarnation", "endpoint", "dst")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    src: str
    messages: _containers.RepeatedCompositeFieldContainer[RaftMessage]
    incarnation: int
    endpoint: StreamEndpoint
    dst: str
    def __init__(self, cluster_id: _Optional[str] = ..., src: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[RaftMessage, _Mapping]]] = ..., incarnation: _Optional[int] = ..., endpoint: _Optional[_Union[StreamEndpoint, _Mapping]] = ..., dst: _Optional[str] = ...) -> None: ...

class FrameAck(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: int
    def __init__(self, frames: _Optional[int] = ...) -> None: ...

class PeerEmpty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamEndpoint(_message.Message):
    __slots__ = ("port_offset", "client_address")
    PORT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    port_offset: int
    client_address: str
    def __init__(self, port_offset: _Optional[int] = ..., client_address: _Optional[str] = ...) -> None: ...

class StreamRefusal(_message.Message):
    __slots__ = ("code", "details", "removed_at")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_AT_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    removed_at: int
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ..., removed_at: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("cluster_id", "meta", "offset", "data", "done")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    meta: RaftMessage
    offset: int
    data: bytes
    done: bool
    def __init__(self, cluster_id: _Optional[str] = ..., meta: _Optional[_Union[RaftMessage, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("cluster_id", "id", "address", "list_only", "state_machine", "learner", "machine")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LIST_ONLY_FIELD_NUMBER: _ClassVar[int]
    STATE_MACHINE_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    id: str
    address: str
    list_only: bool
    state_machine: str
    learner: bool
    machine: str
    def __init__(self, cluster_id: _Optional[str] = ..., id: _Optional[str] = ..., address: _Optional[str] = ..., list_only: _Optional[bool] = ..., state_machine: _Optional[str] = ..., learner: _Optional[bool] = ..., machine: _Optional[str] = ...) -> None: ...

class AlarmReport(_message.Message):
    __slots__ = ("cluster_id", "src", "alarm", "why")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    ALARM_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    src: str
    alarm: str
    why: str
    def __init__(self, cluster_id: _Optional[str] = ..., src: _Optional[str] = ..., alarm: _Optional[str] = ..., why: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("cluster_id", "src", "method", "request")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    src: str
    method: str
    request: bytes
    def __init__(self, cluster_id: _Optional[str] = ..., src: _Optional[str] = ..., method: _Optional[str] = ..., request: _Optional[bytes] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("response", "applied_index")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    response: bytes
    applied_index: int
    def __init__(self, response: _Optional[bytes] = ..., applied_index: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("key", "value", "client_id", "sequence")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    client_id: int
    sequence: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., client_id: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "read_mode")
    KEY_FIELD_NUMBER: _ClassVar[int]
    READ_MODE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    read_mode: ReadMode
    def __init__(self, key: _Optional[bytes] = ..., read_mode: _Optional[_Union[ReadMode, str]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "value")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: bytes
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[bytes] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "client_id", "sequence")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    client_id: int
    sequence: int
    def __init__(self, key: _Optional[bytes] = ..., client_id: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class CasRequest(_message.Message):
    __slots__ = ("key", "expect_absent", "expected", "value", "client_id", "sequence")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EXPECT_ABSENT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    expect_absent: bool
    expected: bytes
    value: bytes
    client_id: int
    sequence: int
    def __init__(self, key: _Optional[bytes] = ..., expect_absent: _Optional[bool] = ..., expected: _Optional[bytes] = ..., value: _Optional[bytes] = ..., client_id: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class CasResponse(_message.Message):
    __slots__ = ("swapped",)
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    swapped: bool
    def __init__(self, swapped: _Optional[bool] = ...) -> None: ...

class ScanRequest(_message.Message):
    __slots__ = ("prefix", "limit", "read_mode", "start")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    READ_MODE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    prefix: bytes
    limit: int
    read_mode: ReadMode
    start: bytes
    def __init__(self, prefix: _Optional[bytes] = ..., limit: _Optional[int] = ..., read_mode: _Optional[_Union[ReadMode, str]] = ..., start: _Optional[bytes] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ...) -> None: ...

class ScanResponse(_message.Message):
    __slots__ = ("items", "next_key")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[KeyValue]
    next_key: bytes
    def __init__(self, items: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., next_key: _Optional[bytes] = ...) -> None: ...

class Op(_message.Message):
    __slots__ = ("kind", "key", "value", "expected", "expect_absent", "sequence", "read_mode")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PUT: _ClassVar[Op.Kind]
        GET: _ClassVar[Op.Kind]
        DELETE: _ClassVar[Op.Kind]
        CAS: _ClassVar[Op.Kind]
        PUT_MANY: _ClassVar[Op.Kind]
    PUT: Op.Kind
    GET: Op.Kind
    DELETE: Op.Kind
    CAS: Op.Kind
    PUT_MANY: Op.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    EXPECT_ABSENT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    READ_MODE_FIELD_NUMBER: _ClassVar[int]
    kind: Op.Kind
    key: bytes
    value: bytes
    expected: bytes
    expect_absent: bool
    sequence: int
    read_mode: ReadMode
    def __init__(self, kind: _Optional[_Union[Op.Kind, str]] = ..., key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., expected: _Optional[bytes] = ..., expect_absent: _Optional[bool] = ..., sequence: _Optional[int] = ..., read_mode: _Optional[_Union[ReadMode, str]] = ...) -> None: ...

class SessionFrame(_message.Message):
    __slots__ = ("frame_id", "client_id", "ops")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    client_id: int
    ops: _containers.RepeatedCompositeFieldContainer[Op]
    def __init__(self, frame_id: _Optional[int] = ..., client_id: _Optional[int] = ..., ops: _Optional[_Iterable[_Union[Op, _Mapping]]] = ...) -> None: ...

class OpResult(_message.Message):
    __slots__ = ("ok", "value", "code", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    value: bytes
    code: int
    error: str
    def __init__(self, ok: _Optional[bool] = ..., value: _Optional[bytes] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SessionResult(_message.Message):
    __slots__ = ("frame_id", "results", "leader", "code", "error")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    results: _containers.RepeatedCompositeFieldContainer[OpResult]
    leader: str
    code: int
    error: str
    def __init__(self, frame_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[OpResult, _Mapping]]] = ..., leader: _Optional[str] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SessionHello(_message.Message):
    __slots__ = ("cluster_id",)
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    def __init__(self, cluster_id: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Member(_message.Message):
    __slots__ = ("id", "address", "role", "match_index", "client_address")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    role: str
    match_index: int
    client_address: str
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[str] = ..., match_index: _Optional[int] = ..., client_address: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("id", "role", "term", "leader", "leader_address", "commit_index", "applied_index", "last_index", "members", "cluster_id", "first_index", "snapshot_index", "alarms", "state_bytes", "version", "session_port")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    ALARMS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_PORT_FIELD_NUMBER: _ClassVar[int]
    id: str
    role: str
    term: int
    leader: str
    leader_address: str
    commit_index: int
    applied_index: int
    last_index: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    cluster_id: str
    first_index: int
    snapshot_index: int
    alarms: _containers.RepeatedScalarFieldContainer[str]
    state_bytes: int
    version: str
    session_port: int
    def __init__(self, id: _Optional[str] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., leader: _Optional[str] = ..., leader_address: _Optional[str] = ..., commit_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., last_index: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., cluster_id: _Optional[str] = ..., first_index: _Optional[int] = ..., snapshot_index: _Optional[int] = ..., alarms: _Optional[_Iterable[str]] = ..., state_bytes: _Optional[int] = ..., version: _Optional[str] = ..., session_port: _Optional[int] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("client_id", "sequence", "command")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    sequence: int
    command: bytes
    def __init__(self, client_id: _Optional[int] = ..., sequence: _Optional[int] = ..., command: _Optional[bytes] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("result", "index", "term")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    result: bytes
    index: int
    term: int
    def __init__(self, result: _Optional[bytes] = ..., index: _Optional[int] = ..., term: _Optional[int] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("request", "read_mode")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    READ_MODE_FIELD_NUMBER: _ClassVar[int]
    request: bytes
    read_mode: ReadMode
    def __init__(self, request: _Optional[bytes] = ..., read_mode: _Optional[_Union[ReadMode, str]] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: bytes
    def __init__(self, result: _Optional[bytes] = ...) -> None: ...

class TransferLeaderRequest(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: str
    def __init__(self, target: _Optional[str] = ...) -> None: ...

class TransferLeaderResponse(_message.Message):
    __slots__ = ("leader", "term")
    LEADER_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    leader: str
    term: int
    def __init__(self, leader: _Optional[str] = ..., term: _Optional[int] = ...) -> None: ...

class MemberListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberAddRequest(_message.Message):
    __slots__ = ("id", "address", "learner")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    learner: bool
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., learner: _Optional[bool] = ...) -> None: ...

class MemberRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class MembersResponse(_message.Message):
    __slots__ = ("members", "leader", "config_index", "committed", "cluster_id", "commit_index", "note")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    leader: str
    config_index: int
    committed: bool
    cluster_id: str
    commit_index: int
    note: str
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., leader: _Optional[str] = ..., config_index: _Optional[int] = ..., committed: _Optional[bool] = ..., cluster_id: _Optional[str] = ..., commit_index: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class AlarmRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AlarmResponse(_message.Message):
    __slots__ = ("alarms", "state_bytes", "quota_bytes")
    ALARMS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    alarms: _containers.RepeatedScalarFieldContainer[str]
    state_bytes: int
    quota_bytes: int
    def __init__(self, alarms: _Optional[_Iterable[str]] = ..., state_bytes: _Optional[int] = ..., quota_bytes: _Optional[int] = ...) -> None: ...

class SnapshotSaveRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackupChunk(_message.Message):
    __slots__ = ("index", "term", "size", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    term: int
    size: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., term: _Optional[int] = ..., size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
