"""A :class:`concurrent.futures.Executor` that runs commands on a Warren pool.

    with WarrenExecutor(queue="gdal") as pool:
        futures = [pool.submit(["gdal_translate", "-of", "COG", f, f + ".cog.tif"]) for f in files]
        for future in concurrent.futures.as_completed(futures):
            print(future.result()["stdout"])

Each :meth:`WarrenExecutor.submit` publishes one task of an open batch and returns a future. A
future's result is the task's output (for ``exec``: exit code, stdout, stderr, outputs); a task
that does not succeed raises :class:`TaskFailed` from ``future.result()``. One background thread
owns the broker connection (pika connections are not thread-safe); submit from any thread.
"""

from __future__ import annotations

import queue as queue_module
import threading
from concurrent.futures import Executor, Future
from typing import Any, Dict, Optional, Sequence, Tuple, Union, cast

from . import protocol
from .client import Client, Task, WarrenError, _properties


class TaskFailed(WarrenError):
    """A task ended without success; ``result`` is its whole result (status, error, output)."""

    def __init__(self, result: Dict[str, Any]) -> None:
        error = result.get("error") or {}
        super().__init__(
            f"task {result.get('task_id')} {result.get('status')}: "
            f"{error.get('kind', '')}: {error.get('message', '')}"
        )
        self.result = result


_Item = Tuple[Task, "Future[Any]"]


class WarrenExecutor(Executor):
    """Runs tasks on the workers consuming ``queue``; see the module's documentation."""

    def __init__(
        self,
        queue: str = protocol.DEFAULT_QUEUE,
        url: Optional[str] = None,
        *,
        create_queue: bool = False,
        result_expiry_hours: float = protocol.DEFAULT_RESULT_EXPIRY_HOURS,
    ) -> None:
        self.queue = queue
        self.batch = protocol.new_id()
        self._token = protocol.new_token()
        self._outbox: "queue_module.Queue[Optional[_Item]]" = queue_module.Queue()
        self._shutdown = False
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._failure: Optional[BaseException] = None
        self._thread = threading.Thread(
            target=self._run,
            args=(url, create_queue, result_expiry_hours),
            name=f"warren-executor-{self.batch}",
            daemon=True,
        )
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            raise self._failure

    def submit(  # type: ignore[override]
        self,
        argv: Union[Sequence[str], Task],
        /,
        *,
        cwd: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        outputs: Optional[Sequence[str]] = None,
        timeout_s: Optional[float] = None,
        labels: Optional[Dict[str, str]] = None,
        max_retries: Optional[int] = None,
    ) -> "Future[Any]":
        """Submits ``argv`` as an ``exec`` task (or any :class:`Task`); returns its future."""
        if isinstance(argv, Task):
            task = argv
        else:
            if isinstance(argv, str):
                raise TypeError("argv must be a list of strings (the program first), not one string")
            task = Task.exec(
                argv,
                cwd=cwd,
                env=env,
                outputs=outputs,
                timeout_s=timeout_s,
                labels=labels or {},
                max_retries=max_retries,
            )
        task.check()
        future: "Future[Any]" = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            if self._failure is not None:
                raise WarrenError(f"the executor's connection failed: {self._failure}")
            self._outbox.put((task, future))
        return future

    def map(  # type: ignore[override]
        self, fn: Any, *iterables: Any, timeout: Optional[float] = None, chunksize: int = 1
    ) -> Any:
        """As :meth:`concurrent.futures.Executor.map`, where ``fn(*items)`` returns the argv (or
        :class:`Task`) to run for each set of items: ``pool.map(lambda f: ["gdalinfo", f], files)``.
        Yields the outputs in order (raises TaskFailed). ``map(argvs)``, a plain iterable of argvs,
        works too."""
        argvs = map(fn, *iterables) if callable(fn) else fn
        futures = [self.submit(argv) for argv in argvs]

        def outputs() -> Any:
            for future in futures:
                yield future.result(timeout=timeout)

        return outputs()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops taking tasks. With ``wait``, returns once every submitted task has its result,
        then deletes the batch's queues."""
        with self._lock:
            self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    item = self._outbox.get_nowait()
                except queue_module.Empty:
                    break
                if item is not None:
                    item[1].cancel()
        self._outbox.put(None)
        if wait:
            self._thread.join()

    # The background thread: publishes what was submitted and resolves futures from results.
    def _run(self, url: Optional[str], create_queue: bool, expiry_hours: float) -> None:
        waiting: Dict[int, "Future[Any]"] = {}
        try:
            client = Client(url)
            client.declare_task_queue(self.queue, create=create_queue)
            client._declare_batch(self.queue, self.batch, expiry_hours)
        except BaseException as error:  # reported to the constructor's caller
            self._failure = error
            self._started.set()
            return
        self._started.set()
        results = client.connection.channel()
        results.basic_qos(prefetch_count=256)

        def on_result(channel: Any, method: Any, _properties_: Any, body: bytes) -> None:
            try:
                result = protocol.decode(body)
            except ValueError:
                channel.basic_reject(method.delivery_tag, requeue=False)
                return
            if result.get("batch") != self.batch or result.get("token") != self._token:
                channel.basic_reject(method.delivery_tag, requeue=False)
                return
            result.pop("token", None)
            result_seq = result.get("seq")
            # None: a repeat (results come at least once).
            future = waiting.pop(result_seq, None) if isinstance(result_seq, int) else None
            if future is not None:
                if result.get("status") == "succeeded":
                    future.set_result(result.get("output"))
                else:
                    future.set_exception(TaskFailed(result))
            channel.basic_ack(method.delivery_tag)

        results.basic_consume(protocol.result_queue(self.batch), on_result, exclusive=True)
        seq = 0
        closing = False
        try:
            while not (closing and not waiting):
                while True:
                    try:
                        item = self._outbox.get_nowait()
                    except queue_module.Empty:
                        break
                    if item is None:
                        closing = True
                        continue
                    task, future = item
                    if not future.set_running_or_notify_cancel():
                        continue
                    try:
                        self._publish(client, task, seq)
                    except BaseException as error:
                        future.set_exception(error)
                        continue
                    waiting[seq] = future
                    seq += 1
                client.connection.process_data_events(time_limit=cast(Any, 0.05))
            results.queue_delete(protocol.result_queue(self.batch))
            results.queue_delete(protocol.manifest_queue(self.batch))
        except BaseException as error:
            self._failure = error
            for future in waiting.values():
                future.set_exception(
                    WarrenError(
                        f"lost the broker connection ({error!r}); the task may still run; its result stays "
                        f"in batch {self.batch}'s result queue until it expires"
                    )
                )
        finally:
            client.close()

    def _publish(self, client: Client, task: Task, seq: int) -> None:
        envelope = task.envelope(self.batch, seq, self._token)
        properties = _properties(
            protocol.TYPE_TASK,
            message_id=envelope["id"],
            correlation_id=self.batch,
            reply_to=protocol.result_queue(self.batch),
            headers={
                protocol.HEADER_VERSION: protocol.PROTOCOL_VERSION,
                protocol.HEADER_SEQ: seq,
                protocol.HEADER_KIND: task.kind,
                protocol.HEADER_TOKEN: self._token,
            },
        )
        client._publish(self.queue, envelope, properties)

