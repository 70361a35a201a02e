"""End-to-end tests of warren_client against a real RabbitMQ and a real `warren worker`.

Run by the Rust test tests/python_client.rs, which starts a worker (allowing `sh`) on the queue
WARREN_TEST_QUEUE and sets WARREN_BIN to the `warren` binary and WARREN_AMQP_URL to the broker.
"""

import json
import math
import os
import subprocess
import tempfile
import unittest
import uuid
from concurrent.futures import as_completed

from warren_client import (
    Client,
    QueueMissing,
    Task,
    TaskFailed,
    UnknownBatch,
    WarrenExecutor,
)

QUEUE = os.environ.get("WARREN_TEST_QUEUE", "warren.tasks")
WARREN = os.environ.get("WARREN_BIN", "warren")


def warren(*args, stdin=None):
    return subprocess.run(
        [WARREN, *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def close_my_connection():
    """Has the broker close this process's connections (as a node shutting down would), through
    the management API; False when none was found within 15 s (its statistics lag)."""
    import base64
    import time
    import urllib.request

    auth = base64.b64encode(b"guest:guest").decode()

    def call(method, path):
        request = urllib.request.Request(
            "http://127.0.0.1:15672" + path, method=method, headers={"Authorization": "Basic " + auth}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            return json.loads(body) if body else None

    suffix = f"-{os.getpid()}"
    until = time.monotonic() + 15
    while time.monotonic() < until:
        mine = [
            c["name"]
            for c in call("GET", "/api/connections")
            if str((c.get("client_properties") or {}).get("connection_name", "")).endswith(suffix)
        ]
        if mine:
            for name in mine:
                call("DELETE", "/api/connections/" + urllib.request.quote(name, safe=""))
            return True
        time.sleep(0.5)
    return False


def lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class SubmitAndCollect(unittest.TestCase):
    def setUp(self):
        self.client = Client()

    def tearDown(self):
        self.client.close()

    def test_a_streamed_batch_yields_each_result_once(self):
        tasks = (Task(kind="echo", args={"n": n}, labels={"from": "python"}) for n in range(25))
        batch = self.client.submit(tasks, queue=QUEUE)
        results = list(batch.results(timeout=60))
        self.assertEqual(sorted(r["output"]["n"] for r in results), list(range(25)))
        self.assertTrue(all(r["labels"] == {"from": "python"} for r in results))
        self.assertTrue(all(r["batch"] == batch.id and "token" not in r for r in results))
        self.assertTrue(batch.complete())

    def test_a_python_batch_is_collected_by_warren_wait(self):
        batch = self.client.submit([{"kind": "echo", "args": n} for n in range(7)], queue=QUEUE)
        waited = warren("wait", batch.id)
        self.assertEqual(waited.returncode, 0, waited.stderr)
        self.assertEqual(sorted(r["output"] for r in lines(waited.stdout)), list(range(7)))

    def test_a_warren_submit_batch_is_collected_in_python(self):
        task_lines = "".join(json.dumps({"kind": "echo", "args": [n]}) + "\n" for n in range(5))
        submitted = warren("submit", "--queue", QUEUE, "--file", "-", stdin=task_lines)
        self.assertEqual(submitted.returncode, 0, submitted.stderr)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "results.jsonl")
            summary = self.client.batch(submitted.stdout.strip()).wait(path, timeout=60)
            self.assertTrue(summary.complete)
            self.assertEqual(summary.by_status, {"succeeded": 5})
            with open(path) as written:
                self.assertEqual(sorted(r["output"][0] for r in lines(written.read())), list(range(5)))

    def test_an_interrupted_python_wait_leaves_exactly_the_rest_to_warren_wait(self):
        batch = self.client.submit([Task(kind="echo", args=n) for n in range(300)], queue=QUEUE)
        taken = []
        for result in batch.results(timeout=60):
            taken.append(result["seq"])
            if len(taken) == 120:
                break  # closing the iterator records what was taken in the manifest
        waited = warren("wait", batch.id)
        self.assertEqual(waited.returncode, 0, waited.stderr)
        rest = [r["seq"] for r in lines(waited.stdout)]
        self.assertEqual(len(rest), 180, "warren wait writes only what python did not take")
        self.assertEqual(sorted(taken + rest), list(range(300)))

    def test_a_collection_rides_out_a_connection_the_broker_closes(self):
        batch = self.client.submit(
            [{"kind": "sleep", "args": {"ms": 700}} for _ in range(8)], queue=QUEUE
        )
        results = []
        closed = False
        for result in batch.results(timeout=90):
            results.append(result)
            if not closed:
                closed = close_my_connection()
        self.assertTrue(closed, "the broker closed the collecting connection")
        self.assertEqual(sorted(r["seq"] for r in results), list(range(8)))
        self.assertTrue(batch.complete())

    def test_bad_tasks_are_named_before_anything_is_sent(self):
        cases = [
            (Task.exec(["ls"], env={"N": 1}), "args.env"),
            (Task(kind="echo", args={"x": [1, math.nan]}), "args.x[1]"),
            (Task(kind="echo", args={1: "one"}), "map keys must be strings"),
            (Task(kind="echo", args=b"bytes"), "binary"),
            (Task(kind="sleep", args={"ms": "soon"}), "sleep"),
            (Task(kind="exec", args={"argv": []}), "args.argv"),
            (Task(kind="echo", timeout_s=-1), "timeout_s"),
        ]
        for task, named in cases:
            with self.assertRaises(ValueError) as raised:
                self.client.submit([Task(kind="echo"), task], queue=QUEUE)
            self.assertIn("task 1", str(raised.exception))
            self.assertIn(named, str(raised.exception))

    def test_a_missing_queue_and_an_unknown_batch_are_named(self):
        missing = "warren.test.missing-" + uuid.uuid4().hex
        with self.assertRaises(QueueMissing) as raised:
            self.client.submit([Task(kind="echo")], queue=missing)
        self.assertIn(missing, str(raised.exception))
        with self.assertRaises(UnknownBatch):
            list(self.client.batch(str(uuid.uuid4())).results(timeout=5))


class Executor(unittest.TestCase):
    def test_futures_resolve_to_outputs_and_failures_raise(self):
        with WarrenExecutor(queue=QUEUE) as pool:
            hello = pool.submit(["sh", "-c", "echo hello $WHO"], env={"WHO": "warren"})
            failing = pool.submit(["sh", "-c", "echo broken >&2; exit 3"])
            many = [pool.submit(["sh", "-c", f"echo {n}"]) for n in range(10)]
            self.assertEqual(hello.result(timeout=60)["stdout"], "hello warren\n")
            with self.assertRaises(TaskFailed) as raised:
                failing.result(timeout=60)
            self.assertEqual(raised.exception.result["output"]["exit_code"], 3)
            self.assertIn("exit_status", str(raised.exception))
            outputs = sorted(int(f.result()["stdout"]) for f in as_completed(many, timeout=60))
            self.assertEqual(outputs, list(range(10)))
            self.assertEqual(
                [o["stdout"] for o in pool.map([["sh", "-c", "echo a"], ["sh", "-c", "echo b"]], timeout=60)],
                ["a\n", "b\n"],
            )
            # concurrent.futures' shape: a function of the items, then the items.
            self.assertEqual(
                [o["stdout"] for o in pool.map(lambda x, y: ["sh", "-c", f"echo {x}{y}"], "ab", "cd", timeout=60)],
                ["ac\n", "bd\n"],
            )

    def test_a_bad_task_is_refused_at_submit(self):
        with WarrenExecutor(queue=QUEUE) as pool:
            with self.assertRaises(ValueError):
                pool.submit(["sh"], env={"N": 1})
            with self.assertRaises(TypeError):
                pool.submit("sh -c 'echo one string'")


if __name__ == "__main__":
    unittest.main()
