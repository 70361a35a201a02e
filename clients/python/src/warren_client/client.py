"""Submitting batches and collecting their results over RabbitMQ (pika).

A :class:`Client` holds one connection. :meth:`Client.submit` streams tasks into a new batch and
publishes its manifest; :meth:`Client.batch` opens a batch submitted earlier (by this package or
by ``warren submit``). :meth:`Batch.results` yields results as they arrive and records progress in
the batch's manifest exactly as ``warren wait`` does, so either can pick up where the other
stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import pika
import pika.exceptions

from . import protocol
from .protocol import Envelope

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
#: Results taken before a checkpoint records them in the manifest.
CHECKPOINT_AFTER = 100
#: Seconds between checkpoints while results trickle in.
CHECKPOINT_EVERY = 0.5
# How long a collector keeps trying through an outage (a lost connection, a queue without quorum
# while nodes restart), counted from the first failure; as `warren wait --retry-for`.
DEFAULT_COLLECT_RETRY_FOR = 300.0
# Broker answers that mean "not now": INTERNAL_ERROR (a quorum queue without a majority),
# CONNECTION_FORCED (a node shutting down).
_OUTAGE_CODES = {320, 541}


class WarrenError(Exception):
    """Something the broker or a batch did not allow; the message says what and what to do."""


class QueueMissing(WarrenError):
    """The task queue does not exist and ``create_queue`` was not given."""


class UnknownBatch(WarrenError):
    """The batch's result queue does not exist (never submitted, collected, or expired)."""


class BatchBusy(WarrenError):
    """Another collector (``warren wait`` or a :class:`Batch`) holds the batch's results."""


@dataclass
class Task:
    """One task. ``kind`` names the handler; only it is required."""

    kind: str
    args: Any = None
    id: Optional[str] = None
    timeout_s: Optional[float] = None
    labels: Dict[str, str] = field(default_factory=dict)
    max_retries: Optional[int] = None
    retry_backoff_s: Optional[float] = None
    expires_at: Optional[str] = None

    @classmethod
    def exec(
        cls,
        argv: Sequence[str],
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        outputs: Optional[Sequence[str]] = None,
        stdin: Optional[str] = None,
        retry_exit_codes: Optional[Sequence[int]] = None,
        **options: Any,
    ) -> "Task":
        """An ``exec`` task running ``argv`` (the program must be allowed by the workers)."""
        args: Dict[str, Any] = {"argv": list(argv)}
        for name, value in (
            ("cwd", cwd),
            ("env", dict(env) if env is not None else None),
            ("outputs", list(outputs) if outputs is not None else None),
            ("stdin", stdin),
            ("retry_exit_codes", list(retry_exit_codes) if retry_exit_codes is not None else None),
        ):
            if value is not None:
                args[name] = value
        return cls(kind="exec", args=args, **options)

    @classmethod
    def of(cls, value: Union["Task", Mapping[str, Any]]) -> "Task":
        """A task from a Task or from a dict shaped like a task line of ``warren submit``."""
        if isinstance(value, Task):
            return value
        known = {"kind", "args", "id", "timeout_s", "labels", "max_retries", "retry_backoff_s", "expires_at"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown task field(s) {sorted(unknown)}; known: {sorted(known)}")
        if "kind" not in value:
            raise ValueError('a task needs "kind"')
        return cls(**{k: v for k, v in value.items() if v is not None or k == "args"})

    def check(self) -> None:
        """Raises ValueError naming the field when a worker would refuse the task."""
        if not isinstance(self.kind, str) or not self.kind.strip():
            raise ValueError("kind: must be a non-empty string")
        if self.id is not None:
            protocol.check_id("id", self.id)
        if self.timeout_s is not None and not (
            isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s < float("inf")
        ):
            raise ValueError(f"timeout_s: must be a positive number of seconds, got {self.timeout_s!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()):
            raise ValueError("labels: must map strings to strings")
        if self.max_retries is not None and not (
            isinstance(self.max_retries, int) and 0 <= self.max_retries <= protocol.MAX_RETRIES
        ):
            raise ValueError(f"max_retries: must be 0 to {protocol.MAX_RETRIES}")
        if self.retry_backoff_s is not None and not (0 < self.retry_backoff_s <= protocol.MAX_RETRY_DELAY_S):
            raise ValueError(f"retry_backoff_s: must be above 0 and at most {protocol.MAX_RETRY_DELAY_S}")
        protocol.check_args(self.kind, self.args)

    def envelope(self, batch: str, seq: int, token: str) -> Envelope:
        """The task's envelope as seq ``seq`` of ``batch``."""
        envelope: Envelope = {
            "v": protocol.PROTOCOL_VERSION,
            "id": self.id or f"{batch}-{seq}",
            "batch": batch,
            "seq": seq,
            "kind": self.kind,
            "args": self.args,
            "reply_to": protocol.result_queue(batch),
            "submitted_at": protocol.now(),
            "token": token,
        }
        if self.labels:
            envelope["labels"] = dict(self.labels)
        for name in ("timeout_s", "max_retries", "retry_backoff_s", "expires_at"):
            value = getattr(self, name)
            if value is not None:
                envelope[name] = value
        return envelope


@dataclass
class Summary:
    """What a :meth:`Batch.wait` collected."""

    batch: str
    total: Optional[int]
    #: Results this collector wrote, by status.
    by_status: Dict[str, int]
    #: Whether every task's result is in (else the timeout passed).
    complete: bool

    @property
    def failed(self) -> int:
        """Results that did not succeed."""
        return sum(n for status, n in self.by_status.items() if status != "succeeded")


def _properties(message_type: str, **extra: Any) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=protocol.CONTENT_TYPE, delivery_mode=2, type=message_type, **extra
    )


class Client:
    """A connection to the broker. Use as a context manager, or call :meth:`close`."""

    def __init__(self, url: Optional[str] = None, *, connect_timeout: float = 10.0) -> None:
        self.url = url or os.environ.get("WARREN_AMQP_URL") or DEFAULT_URL
        parameters = pika.URLParameters(self.url)
        parameters.socket_timeout = connect_timeout
        parameters.blocked_connection_timeout = 300
        # Named like the CLI's connections, so the broker's connection list says who it is.
        parameters.client_properties = {"connection_name": f"warren-python@{os.uname().nodename}-{os.getpid()}"}
        self._parameters = parameters
        try:
            self.connection = pika.BlockingConnection(parameters)
        except pika.exceptions.AMQPError as error:
            host = f"{parameters.host}:{parameters.port}"
            raise WarrenError(f"cannot connect to RabbitMQ at {host}: {error!r}") from error
        # Every message carries the connection's user as its user_id, which RabbitMQ verifies:
        # consumers can trust who sent it.
        self.user: Optional[str] = parameters.credentials.username if isinstance(
            parameters.credentials, pika.PlainCredentials
        ) else None
        self.channel = self.connection.channel()
        # basic_publish now raises on a nack or a return (mandatory): a task counts as sent only
        # once the broker has it.
        self.channel.confirm_delivery()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection."""
        if self.connection.is_open:
            self.connection.close()

    def _reconnect(self) -> None:
        """Opens a new connection after an outage (the old one is dropped)."""
        try:
            if self.connection.is_open:
                self.connection.close()
        except pika.exceptions.AMQPError:
            pass
        self.connection = pika.BlockingConnection(self._parameters)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def _publish(self, queue: str, envelope: Mapping[str, Any], properties: pika.BasicProperties) -> None:
        if self.user:
            properties.user_id = self.user
        try:
            self.channel.basic_publish("", queue, protocol.encode(envelope), properties, mandatory=True)
        except pika.exceptions.UnroutableError as error:
            raise WarrenError(f"no queue took the message to '{queue}' (deleted?)") from error
        except pika.exceptions.NackError as error:
            raise WarrenError(f"the broker refused the message to '{queue}'") from error

    def declare_task_queue(self, queue: str, *, create: bool) -> None:
        """Declares ``queue`` and its dead-letter queue; with ``create`` false, first checks that
        the queue exists (a mistyped name would otherwise become a queue no worker serves)."""
        if not create:
            probe = self.connection.channel()
            _inspect(
                probe,
                queue,
                QueueMissing(
                    f"task queue '{queue}' does not exist, so no worker or autoscaler serves it: check the "
                    "name (`warren status` lists the task queues), or pass create_queue=True"
                ),
            )
            probe.close()
        dead = protocol.dead_letter_queue(queue)
        self.channel.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum"})
        self.channel.queue_declare(queue, durable=True, arguments=protocol.task_queue_arguments(queue))

    def _declare_batch(self, queue: str, batch: str, expiry_hours: float) -> None:
        expiry_ms = int(expiry_hours * 3600 * 1000)
        self.channel.queue_declare(
            protocol.result_queue(batch),
            durable=True,
            arguments=protocol.batch_queue_arguments(queue, expiry_ms, results=True),
        )
        self.channel.queue_declare(
            protocol.manifest_queue(batch),
            durable=True,
            arguments=protocol.batch_queue_arguments(queue, expiry_ms, results=False),
        )

    def submit(
        self,
        tasks: Iterable[Union[Task, Mapping[str, Any]]],
        *,
        queue: str = protocol.DEFAULT_QUEUE,
        create_queue: bool = False,
        result_expiry_hours: float = protocol.DEFAULT_RESULT_EXPIRY_HOURS,
    ) -> "Batch":
        """Submits ``tasks`` as one batch and returns it.

        ``tasks`` is read once, lazily: a generator of millions of tasks is streamed, one
        confirmed publish at a time. A list or tuple is checked whole before anything is sent;
        from any other iterable, a bad task raises ValueError (naming its index, the batch and
        how many tasks were sent) when it is reached."""
        checked_first = isinstance(tasks, (list, tuple))
        if checked_first:
            listed = [Task.of(t) for t in tasks]
            for index, task in enumerate(listed):
                _checked(task, index)
            tasks = listed
        batch = protocol.new_id()
        token = protocol.new_token()
        self.declare_task_queue(queue, create=create_queue)
        self._declare_batch(queue, batch, result_expiry_hours)
        ids: Set[str] = set()
        total = 0
        for index, value in enumerate(tasks):
            try:
                task = Task.of(value)
                if not checked_first:
                    _checked(task, index)
                envelope = task.envelope(batch, index, token)
                if envelope["id"] in ids:
                    raise ValueError(f"task {index}: id '{envelope['id']}' is used twice in this batch")
                body = protocol.encode(envelope)
                if len(body) > protocol.MAX_MESSAGE_BYTES:
                    raise ValueError(
                        f"task {index}: {len(body)} bytes encoded, over the {protocol.MAX_MESSAGE_BYTES} byte "
                        "limit; pass large data as files on a shared volume"
                    )
            except ValueError as error:
                if total:
                    raise ValueError(
                        f"{error}; {total} task(s) of batch {batch} were already sent and will run "
                        f"(stop them with: warren cancel {batch})"
                    ) from error
                raise
            ids.add(envelope["id"])
            properties = _properties(
                protocol.TYPE_TASK,
                message_id=envelope["id"],
                correlation_id=batch,
                reply_to=protocol.result_queue(batch),
                headers={
                    protocol.HEADER_VERSION: protocol.PROTOCOL_VERSION,
                    protocol.HEADER_SEQ: index,
                    protocol.HEADER_KIND: task.kind,
                    protocol.HEADER_TOKEN: token,
                },
            )
            self._publish(queue, envelope, properties)
            total += 1
        if total == 0:
            raise ValueError("no tasks to submit")
        manifest = {
            "v": protocol.PROTOCOL_VERSION,
            "batch": batch,
            "total": total,
            "queue": queue,
            "generation": 0,
            "collected": [],
            "token": token,
        }
        self._publish(protocol.manifest_queue(batch), manifest, _properties(protocol.TYPE_MANIFEST))
        return Batch(self, batch)

    def batch(self, batch_id: str) -> "Batch":
        """A batch submitted earlier (by this package or ``warren submit``), to collect."""
        protocol.check_id("batch", batch_id)
        return Batch(self, batch_id)


def _inspect(channel: Any, queue: str, missing: WarrenError) -> Any:
    """Passive declare of ``queue`` (its counts); raises ``missing`` when it does not exist. A
    failed passive declare closes ``channel``."""
    try:
        return channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code == 404:
            raise missing from error
        raise


def _tag(method: Any) -> int:
    """The delivery tag of a delivery's method frame."""
    return int(method.delivery_tag)


def _checked(task: Task, index: int) -> None:
    try:
        task.check()
    except ValueError as error:
        raise ValueError(f"task {index}: {error}") from error


class Batch:
    """A submitted batch. :meth:`results` and :meth:`wait` collect it with the manifest protocol
    of ``warren wait`` (docs/protocol.md, "Batches and warren wait")."""

    def __init__(self, client: Client, batch_id: str) -> None:
        self.client = client
        self.id = batch_id
        self.manifest: Optional[Envelope] = None
        self._written: Set[int] = set()
        self._replays: Set[Tuple[int, int]] = set()
        self._replays_collected: Set[Tuple[int, int]] = set()

    def __repr__(self) -> str:
        return f"Batch({self.id!r})"

    @property
    def total(self) -> Optional[int]:
        """Tasks in the batch, once its manifest has been read."""
        return None if self.manifest is None else int(self.manifest["total"])

    def complete(self) -> bool:
        """Whether every task's result (and every replay's) has been collected."""
        total = self.total
        return (
            total is not None
            and len(self._written) >= total
            and all(seq in self._written for seq in range(total))
            and self._replays <= self._replays_collected
        )

    def _checkpoint(self, results: Any, ack_tag: Optional[int]) -> None:
        """Takes every manifest, publishes the next generation merged with what was written,
        then acks the manifests taken and the results up to ``ack_tag``."""
        channel = self.client.channel
        queue = protocol.manifest_queue(self.id)
        taken: List[int] = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            taken.append(_tag(method))
            # Only this collector's own user may say what the batch is and what was collected
            # (RabbitMQ verifies user_id): a manifest from anyone else is set aside.
            if self.client.user and getattr(properties, "user_id", None) != self.client.user:
                continue
            try:
                manifest = protocol.decode(body)
            except ValueError:
                continue
            if manifest.get("batch") != self.id:
                continue
            self._written |= protocol.expand(manifest.get("collected") or [])
            self._replays |= protocol.pairs(manifest.get("replays"))
            self._replays_collected |= protocol.pairs(manifest.get("replays_collected"))
            if self.manifest is None or manifest.get("generation", 0) >= self.manifest.get("generation", 0):
                self.manifest = manifest
        if self.manifest is None:
            for tag in taken:
                channel.basic_nack(tag, requeue=True)
            return
        if ack_tag is None and not taken:
            return
        following = dict(self.manifest)
        following["generation"] = int(self.manifest.get("generation", 0)) + 1
        following["collected"] = protocol.ranges(self._written)
        if self._replays:
            following["replays"] = sorted([s, r] for s, r in self._replays)
        if self._replays_collected:
            following["replays_collected"] = sorted([s, r] for s, r in self._replays_collected)
        self.client._publish(queue, following, _properties(protocol.TYPE_MANIFEST))
        self.manifest = following
        if taken:
            channel.basic_ack(max(taken), multiple=True)
        if ack_tag is not None:
            results.basic_ack(ack_tag, multiple=True)

    def _foreign(self, result: Envelope, sender: Optional[str] = None) -> Optional[str]:
        if result.get("batch") != self.id:
            return f"it names batch {result.get('batch')!r}"
        if self.manifest is None:
            return None
        answerers = self.manifest.get("answerers")
        if answerers is not None and sender not in answerers:
            return f"it was published by {sender!r}, who may not answer this batch"
        seq = result.get("seq")
        if isinstance(seq, int) and seq >= int(self.manifest["total"]):
            return f"its seq {seq} is beyond the batch's {self.manifest['total']} task(s)"
        token = self.manifest.get("token")
        if token is not None and result.get("token") != token:
            return "it does not carry the batch's token"
        return None

    def _fresh(self, result: Envelope, results: Any) -> bool:
        seq, replay = result.get("seq"), result.get("replayed")
        if not isinstance(seq, int):
            return True
        if isinstance(replay, int):
            if (seq, replay) not in self._replays and seq in self._written:
                # The replay may be newer than the manifest read last.
                self._checkpoint(results, None)
            wanted = (seq, replay) in self._replays and (seq, replay) not in self._replays_collected
            if wanted:
                self._replays_collected.add((seq, replay))
            new = seq not in self._written
            self._written.add(seq)
            return new or wanted
        if seq in self._written:
            return False
        self._written.add(seq)
        return True

    def results(
        self,
        *,
        timeout: Optional[float] = None,
        retry_for: float = DEFAULT_COLLECT_RETRY_FOR,
        _before_checkpoint: Optional[Any] = None,
    ) -> Iterator[Envelope]:
        """Yields each task's result (a dict, as in ``warren wait``'s lines) once, as it arrives,
        until all are in or ``timeout`` seconds pass. Progress is recorded in the batch's manifest
        every few results: a collector that stops (or dies) leaves the rest to the next one, which
        may be ``warren wait``. Handle each result before asking for the next; results not yet
        recorded when a process dies are delivered again to the next collector.

        An outage (a lost connection, a queue that lost its quorum while RabbitMQ nodes restart)
        is waited through: the client reconnects with backoff for up to ``retry_for`` seconds,
        counted from the first failure, and goes on where it was; past that it raises
        :class:`WarrenError` saying how to finish."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failing_since: Optional[float] = None
        pause = 0.2
        while True:
            try:
                for result in self._session(deadline, _before_checkpoint):
                    failing_since, pause = None, 0.2
                    yield result
                return
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelClosedByBroker,
                    pika.exceptions.ChannelWrongStateError) as error:
                if isinstance(error, pika.exceptions.ChannelClosedByBroker) and error.reply_code not in _OUTAGE_CODES:
                    raise
                if isinstance(error, pika.exceptions.ConnectionClosedByBroker) and error.reply_code not in _OUTAGE_CODES:
                    raise
                now = time.monotonic()
                failing_since = failing_since if failing_since is not None else now
                if now - failing_since >= retry_for:
                    raise WarrenError(
                        f"collecting batch {self.id} failed for {retry_for:.0f} s ({error!r}); every "
                        f"result given so far is recorded: finish with `warren wait {self.id}` or "
                        "results() once the broker and its nodes are back"
                    ) from error
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
                try:
                    self.client._reconnect()
                except pika.exceptions.AMQPError:
                    continue

    def _session(self, deadline: Optional[float], _before_checkpoint: Optional[Any]) -> Iterator[Envelope]:
        """One connection's part of :meth:`results`."""
        connection = self.client.connection
        results = connection.channel()
        results.basic_qos(prefetch_count=256)
        queue = protocol.result_queue(self.id)
        declared = _inspect(
            results,
            queue,
            UnknownBatch(
                f"batch {self.id} not found: its results queue does not exist (never submitted, "
                "already collected, or expired)"
            ),
        )
        if declared.method.consumer_count > 0:
            results.close()
            raise BatchBusy(
                f"batch {self.id} is being collected by another process (warren wait or a client); "
                "only one may hold it"
            )
        before = _before_checkpoint or (lambda: None)
        self._checkpoint(results, None)
        last_tag: Optional[int] = None
        pending = 0
        last_checkpoint = time.monotonic()
        try:
            stream = results.consume(queue, exclusive=True, inactivity_timeout=0.2)
            for method, properties, body in stream:
                if self.complete():
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if method is None or time.monotonic() - last_checkpoint >= CHECKPOINT_EVERY:
                    if pending or self.manifest is None:
                        before()
                        known = self.manifest is not None
                        self._checkpoint(results, last_tag if known else None)
                        if known:
                            pending, last_tag = 0, None
                    last_checkpoint = time.monotonic()
                    if self.complete():
                        break
                    if method is None:
                        continue
                try:
                    result = protocol.decode(body)
                except ValueError:
                    results.basic_reject(_tag(method), requeue=False)
                    continue
                why = self._foreign(result, getattr(properties, "user_id", None))
                if why is not None:
                    results.basic_reject(_tag(method), requeue=False)
                    continue
                result.pop("token", None)
                fresh = self._fresh(result, results)
                last_tag = _tag(method)
                pending += 1
                if fresh:
                    yield result
                if pending >= CHECKPOINT_AFTER and self.manifest is not None:
                    before()
                    self._checkpoint(results, last_tag)
                    pending, last_tag = 0, None
                if self.complete():
                    break
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code == 403:
                raise BatchBusy(
                    f"batch {self.id} is being collected by another process (warren wait or a client); "
                    "only one may hold it"
                ) from error
            raise
        finally:
            if results.is_open:
                if self.complete():
                    before()
                    if last_tag is not None:
                        results.basic_ack(last_tag, multiple=True)
                    results.cancel()
                    results.queue_delete(protocol.result_queue(self.id))
                    results.queue_delete(protocol.manifest_queue(self.id))
                else:
                    if self.manifest is not None and last_tag is not None:
                        before()
                        self._checkpoint(results, last_tag)
                    results.cancel()
                results.close()

    def wait(
        self,
        output: Union[None, str, Path, IO[str]] = None,
        *,
        timeout: Optional[float] = None,
    ) -> Summary:
        """Collects every result, writing each as a JSON line to ``output`` (a path, appended to,
        or an open text file), and returns a :class:`Summary`. Without ``output`` the results are
        only counted."""
        by_status: Dict[str, int] = {}
        opened: Optional[IO[str]] = None
        sink: Optional[IO[str]]
        if isinstance(output, (str, Path)):
            opened = open(output, "a", encoding="utf-8")
            sink = opened
        else:
            sink = output

        def flush() -> None:
            if sink is not None:
                sink.flush()

        try:
            for result in self.results(timeout=timeout, _before_checkpoint=flush):
                if sink is not None:
                    sink.write(json.dumps(result) + "\n")
                status = str(result.get("status"))
                by_status[status] = by_status.get(status, 0) + 1
        finally:
            if opened is not None:
                opened.close()
        return Summary(batch=self.id, total=self.total, by_status=by_status, complete=self.complete())
