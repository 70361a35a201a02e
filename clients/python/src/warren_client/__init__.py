"""Warren's Python client: submit tasks to a Warren worker pool on RabbitMQ and collect results.

    from warren_client import Client, Task, WarrenExecutor

    with Client() as client:                      # WARREN_AMQP_URL, else the local broker
        batch = client.submit(Task.exec(["sha256sum", p]) for p in paths)
        for result in batch.results():             # as they arrive; checkpointed like `warren wait`
            print(result["task_id"], result["status"])

The wire format is docs/protocol.md of the Warren repository; batches submitted here can be
collected with `warren wait`, and batches of `warren submit` with :meth:`Client.batch`.
"""

from .client import (
    BatchBusy,
    Batch,
    Client,
    QueueMissing,
    Summary,
    Task,
    UnknownBatch,
    WarrenError,
)
from .executor import TaskFailed, WarrenExecutor
from .protocol import PROTOCOL_VERSION

__all__ = [
    "Batch",
    "BatchBusy",
    "Client",
    "PROTOCOL_VERSION",
    "QueueMissing",
    "Summary",
    "Task",
    "TaskFailed",
    "UnknownBatch",
    "WarrenError",
    "WarrenExecutor",
]
__version__ = "0.1.0"
