"""Pick the compiled hot-path modules or their pure-Python twins, once, at import time.

``RAFTFAST_PUREPYTHON=1`` forces the twins (as msgpack's MSGPACK_PUREPYTHON does); without a
compiled build the twins are used silently.
"""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType, bool]:
    if not os.environ.get("RAFTFAST_PUREPYTHON"):
        try:
            from raftfast import _batch, _log, _store, _sync  # type: ignore[attr-defined]

            return _log, _batch, _store, _sync, True
        except ImportError:
            pass
    from raftfast import _batch_py, _log_py, _store_py, _sync_py

    return _log_py, _batch_py, _store_py, _sync_py, False


log_impl, batch_impl, store_impl, sync_impl, COMPILED = _load()

EntryLog = log_impl.EntryLog
crc32c = batch_impl.crc32c
encode_batch = batch_impl.encode_batch
encode_uniform = batch_impl.encode_uniform
decode_batch = batch_impl.decode_batch
batch_info = batch_impl.batch_info
entries_of_type = batch_impl.entries_of_type
chunk_payloads = batch_impl.chunk_payloads
flatten_pairs = batch_impl.flatten_pairs
commit_index = batch_impl.commit_index
KeyStore = store_impl.KeyStore
load_store = store_impl.load_store
sum_u32 = store_impl.sum_u32
apply_writes = store_impl.apply_writes  # (KVStateMachine's PUTs and DELETEs)
check_packed = store_impl.check_packed
Record = store_impl.Record  # (etcd's, raftfast.etcd.mvcc)
Event = store_impl.Event
