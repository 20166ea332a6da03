"""Log lines as JSON (``--log-format json``): one object per line, for log shippers.

::

    {"time": "2026-12-03T22:08:09.123456Z", "level": "INFO", "node": "n1", "term": 3,
     "message": "node n1 became leader in term 3 (election won)",
     "fields": {"logger": "raftfast.node"}}

``time`` is ISO 8601 in UTC; ``node`` the node's id; ``term`` its current term (null before
the node has one, or for a line no node can be told for); ``fields`` the logger's name, the
exception as text (``exc_info``) when there is one, and whatever ``extra=`` a call passed.

Which node a line is about: a driver binds itself to the context its tasks are created in
(``bind``), so several nodes in one process (``raftfast.Node``) each log under their own id;
lines from elsewhere (a thread) fall back to the formatter's node id and that node's term.
Text (``--log-format text``, the default) is unchanged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import weakref
from datetime import UTC, datetime
from typing import Any, Protocol

__all__ = ["JsonFormatter", "bind", "unbind"]


class _Node(Protocol):
    id: str
    raw: Any  # RawNode | None: its .term


_current: contextvars.ContextVar[_Node | None] = contextvars.ContextVar(
    "raftfast_log_node", default=None
)
_by_id: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

# Every attribute a plain LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def bind(node: _Node) -> contextvars.Token:
    """Lines logged in this context (and the tasks created in it from now on) are ``node``'s;
    ``node`` is also the fallback for lines that name its id. ``_current.reset(token)`` ends
    the binding for this context (tasks created meanwhile keep it)."""
    _by_id[node.id] = node
    return _current.set(node)


def unbind(token: contextvars.Token) -> None:
    _current.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docs). ``node_id``: the id of lines that no
    node is bound to (the process's node, for ``raftfast-node``)."""

    def __init__(self, node_id: str | None = None) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        node = _current.get()
        if node is None and self.node_id is not None:
            node = _by_id.get(self.node_id)
        term = None
        raw = getattr(node, "raw", None)
        if raw is not None:
            try:
                term = raw.term
            except Exception:  # noqa: BLE001 - a log line must never fail for its term
                term = None
        fields: dict[str, Any] = {"logger": record.name}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                fields[key] = value
        if record.exc_info:
            fields["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exc_info"] = record.exc_text
        if record.stack_info:
            fields["stack_info"] = self.formatStack(record.stack_info)
        line = {
            "time": _iso_utc(record.created),
            "level": record.levelname,
            "node": node.id if node is not None else self.node_id,
            "term": term,
            "message": record.getMessage(),
            "fields": fields,
        }
        return json.dumps(line, ensure_ascii=False, default=repr)


def _iso_utc(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="microseconds")[:-6] + "Z"
