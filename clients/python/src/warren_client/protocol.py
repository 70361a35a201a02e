"""Warren's wire protocol, version 1: names, queue arguments and envelopes (docs/protocol.md).

Everything here is plain data; the broker connection lives in :mod:`warren_client.client`.
"""

from __future__ import annotations

import datetime
import math
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Set, Tuple, Union

import msgpack  # type: ignore[import-untyped]

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/msgpack"
TYPE_TASK = "warren.task"
TYPE_RESULT = "warren.result"
TYPE_MANIFEST = "warren.manifest"
HEADER_VERSION = "x-warren-version"
HEADER_SEQ = "x-warren-seq"
HEADER_KIND = "x-warren-kind"
HEADER_TOKEN = "x-warren-token"
DEFAULT_QUEUE = "warren.tasks"
DELIVERY_LIMIT = 10
DEFAULT_RESULT_EXPIRY_HOURS = 7 * 24.0
MAX_ID_LEN = 200
MAX_MESSAGE_BYTES = 16 << 20
MAX_RETRIES = 100
MAX_RETRY_DELAY_S = 3600.0

JsonValue = Any
Envelope = Dict[str, Any]


def result_queue(batch: str) -> str:
    """The queue a batch's results are published to."""
    return "warren.results." + batch


def manifest_queue(batch: str) -> str:
    """The queue that holds a batch's manifests."""
    return "warren.batches." + batch


def dead_letter_queue(queue: str) -> str:
    """The dead-letter queue of a task queue."""
    return queue + ".dead"


def task_queue_arguments(queue: str) -> Dict[str, Any]:
    """The arguments a task queue is declared with (they must match exactly)."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue(queue),
        "x-delivery-limit": DELIVERY_LIMIT,
    }


def batch_queue_arguments(queue: str, expiry_ms: int, results: bool) -> Dict[str, Any]:
    """The arguments of a batch's result queue (``results``) or manifest queue."""
    args: Dict[str, Any] = {"x-queue-type": "quorum", "x-expires": expiry_ms}
    if results:
        args["x-single-active-consumer"] = True
        args["x-dead-letter-exchange"] = ""
        args["x-dead-letter-routing-key"] = dead_letter_queue(queue)
    return args


def encode(envelope: Mapping[str, Any]) -> bytes:
    """Encodes an envelope as a MessagePack map (strings as ``str``, never ``bin``)."""
    return bytes(msgpack.packb(envelope, use_bin_type=True))


def decode(body: Union[bytes, str, None]) -> Envelope:
    """Decodes a MessagePack map; raises ValueError when the body is not one."""
    if not isinstance(body, bytes):
        raise ValueError("no message body")
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as error:  # msgpack raises several unrelated types
        raise ValueError(f"not a MessagePack envelope: {error}") from error
    if not isinstance(value, dict):
        raise ValueError("not a MessagePack map")
    return value


def new_id() -> str:
    """A fresh batch id."""
    return str(uuid.uuid4())


def new_token() -> str:
    """A fresh batch secret (122 random bits)."""
    return uuid.uuid4().hex


def now() -> str:
    """The current time in RFC 3339 with milliseconds, UTC."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def check_json(value: JsonValue, path: str) -> None:
    """Raises ValueError naming the path when ``value`` is outside the JSON data model that task
    ``args`` must stay in: non-string map keys, NaN or infinite floats, bytes, other types."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value} is not accepted: numbers must be finite")
        return
    if isinstance(value, (bytes, bytearray)):
        raise ValueError(f"{path}: binary values are not accepted; pass data as files")
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_json(item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: map keys must be strings, as in JSON, got {key!r}")
            check_json(item, f"{path}.{key}")
        return
    raise ValueError(f"{path}: a {type(value).__name__} is not a JSON value")


_EXEC_FIELDS = {"argv", "env", "cwd", "stdin", "outputs", "retry_exit_codes", "limits"}
_EXEC_LIMITS = {"memory_bytes", "cpu_s", "file_bytes", "open_files", "processes"}


def check_args(kind: str, args: JsonValue) -> None:
    """Checks a task's ``args``: JSON, and for ``exec`` and ``sleep`` the shape their handlers
    read. Raises ValueError naming the field."""
    check_json(args, "args")
    if kind == "exec":
        if not isinstance(args, dict):
            raise ValueError("args: an exec task's args must be a map with at least argv")
        unknown = set(args) - _EXEC_FIELDS
        if unknown:
            raise ValueError(f"args: unknown field(s) {sorted(unknown)}; known: {sorted(_EXEC_FIELDS)}")
        argv = args.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("args.argv: must be a non-empty list of strings (the program first)")
        env = args.get("env")
        if env is not None and not (
            isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
        ):
            raise ValueError("args.env: must be a map of strings to strings")
        for name in ("cwd", "stdin"):
            if args.get(name) is not None and not isinstance(args[name], str):
                raise ValueError(f"args.{name}: must be a string")
        outputs = args.get("outputs")
        if outputs is not None and not (
            isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)
        ):
            raise ValueError("args.outputs: must be a list of paths")
        codes = args.get("retry_exit_codes")
        if codes is not None and not (
            isinstance(codes, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in codes)
        ):
            raise ValueError("args.retry_exit_codes: must be a list of integers")
        limits = args.get("limits")
        if limits is not None and not (
            isinstance(limits, dict)
            and set(limits) <= _EXEC_LIMITS
            and all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in limits.values())
        ):
            raise ValueError(f"args.limits: must be a map of {sorted(_EXEC_LIMITS)} to non-negative integers")
    elif kind == "sleep":
        if not (isinstance(args, dict) and set(args) == {"ms"} and isinstance(args["ms"], int)):
            raise ValueError('args: a sleep task\'s args must be {"ms": int}')


def check_id(field: str, value: Any) -> None:
    """Checks a task or batch id: a string of 1 to 200 bytes without control characters."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field}: must be a non-empty string")
    if len(value.encode()) > MAX_ID_LEN:
        raise ValueError(f"{field}: at most {MAX_ID_LEN} bytes are allowed")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise ValueError(f"{field}: contains control characters")


def ranges(seqs: Iterable[int]) -> List[List[int]]:
    """Inclusive ``[first, last]`` ranges covering ``seqs``, as a manifest's ``collected``."""
    out: List[List[int]] = []
    for seq in sorted(set(seqs)):
        if out and out[-1][1] + 1 == seq:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


def expand(collected: Sequence[Sequence[int]]) -> Set[int]:
    """The seqs a manifest's ``collected`` ranges cover."""
    seqs: Set[int] = set()
    for first, last in collected:
        seqs.update(range(int(first), int(last) + 1))
    return seqs


def pairs(value: Any) -> Set[Tuple[int, int]]:
    """A manifest's ``replays`` / ``replays_collected`` as a set of (seq, replay)."""
    return {(int(p[0]), int(p[1])) for p in (value or [])}
