#!/usr/bin/env python3
"""A Warren client in Python (pika + msgpack), written from docs/protocol.md.

    python3 warren_client.py --queue warren.tasks --count 10          # submit echo tasks, collect results
    python3 warren_client.py --queue warren.tasks --no-wait           # submit, print the batch id, then
    warren wait <batch-id>                                            # ...collect with the CLI

Requires: pip install pika msgpack
"""
import argparse
import datetime
import json
import os
import sys
import time
import uuid

import msgpack
import pika

PROTOCOL_VERSION = 1
DELIVERY_LIMIT = 10
RESULT_EXPIRY_MS = 7 * 24 * 3600 * 1000


def declare_topology(channel, queue, batch):
    """Declares the task queue, its dead-letter queue and the batch's queues (docs/protocol.md, Queues)."""
    dead = queue + ".dead"
    channel.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_declare(queue, durable=True, arguments={
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead,
        "x-delivery-limit": DELIVERY_LIMIT,
    })
    channel.queue_declare("warren.results." + batch, durable=True, arguments={
        "x-expires": RESULT_EXPIRY_MS,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead,
    })
    channel.queue_declare("warren.batches." + batch, durable=True, arguments={"x-expires": RESULT_EXPIRY_MS})


def publish(channel, queue, envelope, properties):
    """Publishes one envelope with confirms and mandatory; raises if it was returned or nacked."""
    channel.basic_publish("", queue, msgpack.packb(envelope, use_bin_type=True), properties, mandatory=True)


def submit(channel, queue, tasks):
    """Submits tasks (dicts with kind, args, ...) as one batch; returns (batch id, task ids)."""
    batch = str(uuid.uuid4())
    reply_to = "warren.results." + batch
    declare_topology(channel, queue, batch)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    ids = []
    for seq, task in enumerate(tasks):
        task_id = task.get("id") or str(uuid.uuid4())
        ids.append(task_id)
        envelope = {
            "v": PROTOCOL_VERSION, "id": task_id, "batch": batch, "seq": seq,
            "kind": task["kind"], "args": task.get("args"), "labels": task.get("labels", {}),
            "reply_to": reply_to, "submitted_at": now,
        }
        if "timeout_s" in task:
            envelope["timeout_s"] = task["timeout_s"]
        props = pika.BasicProperties(
            content_type="application/msgpack", delivery_mode=2, type="warren.task",
            message_id=task_id, correlation_id=batch, reply_to=reply_to,
            headers={"x-warren-version": PROTOCOL_VERSION, "x-warren-seq": seq},
        )
        publish(channel, queue, envelope, props)
    manifest = {"v": PROTOCOL_VERSION, "batch": batch, "total": len(tasks), "queue": queue,
                "generation": 0, "collected": []}
    publish(channel, "warren.batches." + batch, manifest,
            pika.BasicProperties(content_type="application/msgpack", delivery_mode=2, type="warren.manifest"))
    return batch, ids


def collect(channel, batch, total, timeout_s):
    """Reads results until one per seq has arrived; acks each after it is printed."""
    seen = {}
    deadline = time.monotonic() + timeout_s
    queue = "warren.results." + batch
    while len(seen) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)}/{total} results after {timeout_s}s")
        method, _props, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            time.sleep(0.05)
            continue
        result = msgpack.unpackb(body, raw=False)
        if result.get("seq") not in seen:  # at-least-once: skip duplicates
            seen[result.get("seq")] = result
            print(json.dumps(result), flush=True)
        channel.basic_ack(method.delivery_tag)
    channel.queue_delete(queue)
    channel.queue_delete("warren.batches." + batch)
    return list(seen.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    parser.add_argument("--queue", default="warren.tasks")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--no-wait", action="store_true", help="print the batch id and exit")
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    channel.confirm_delivery()  # basic_publish now raises on nack or return
    tasks = [{"kind": "echo", "args": {"n": n}, "labels": {"from": "python"}} for n in range(args.count)]
    try:
        batch, _ = submit(channel, args.queue, tasks)
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
        print(f"error: the broker did not take a task: {error}", file=sys.stderr)
        return 2
    print(batch, flush=True)
    if args.no_wait:
        return 0
    results = collect(channel, batch, len(tasks), args.timeout)
    connection.close()
    failed = [r for r in results if r["status"] != "succeeded"]
    print(f"batch {batch}: {len(results)} results, {len(failed)} not succeeded", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
