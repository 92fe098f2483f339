"""SpecForge's HTTP inbox relay (``specforge/runtime/data_plane/http_inbox.py``) against ferry's
(``ferry_control::http_inbox``), in both directions, with SpecForge's real code on one side and
the ``ferry`` CLI on the other:

* SpecForge's ``RemoteInboxChannel`` reads and acknowledges inboxes through the relay a
  ``ferry consume --inbox-serve`` rank 0 serves (while that rank waits at its group rendezvous:
  the relay starts before it, so a rank in another process can learn its port).
* A ``ferry consume --inbox-url`` rank 1 trains its share through SpecForge's
  ``InboxHTTPServer`` serving the inboxes a ferry rank 0's distributor writes.

Skipped, visibly, without SpecForge or without a built ``ferry`` binary. Loopback only; every
wait has a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "specforge.runtime",
    reason="SpecForge (pip install --no-deps specforge==0.2.0) is not installed: no HTTP inbox interop tests",
)

from specforge.runtime.data_plane.http_inbox import InboxHTTPServer, RemoteInboxChannel  # noqa: E402
from specforge.runtime.data_plane.ref_distributor import RefDistributor  # noqa: E402
from specforge.runtime.data_plane.ref_serialization import ref_from_dict  # noqa: E402
from specforge.runtime.data_plane.streaming_ref_channel import StreamingRefChannel  # noqa: E402

REPO = Path(__file__).resolve().parents[4]
DEADLINE_S = 120.0


def ferry_cli() -> Path | None:
    for profile in ("debug", "release"):
        exe = REPO / "target" / profile / "ferry"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    return None


pytestmark = pytest.mark.skipif(ferry_cli() is None, reason="target/debug/ferry is not built (cargo build -p ferry-cli)")


def sf_ref(sample_id: str):
    return ref_from_dict(
        {
            "sample_id": sample_id,
            "run_id": "run0",
            "source_task_id": None,
            "feature_store_uri": "mem://t",
            "feature_keys": {"input_ids": f"{sample_id}/input_ids"},
            "feature_specs": {
                "input_ids": {
                    "name": "input_ids",
                    "shape": [4],
                    "dtype": "int64",
                    "device_hint": None,
                    "required": True,
                    "target_repr": None,
                    "target_meta": {},
                }
            },
            "strategy": "eagle3",
        }
    )


def ids(refs) -> list[str]:
    return [r.sample_id for r in refs]


class Child:
    """A ``ferry`` process whose stderr is collected line by line on a thread, killed at exit."""

    def __init__(self, args: list, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(ferry_cli()), *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def wait_for_line(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.05)
            except queue.Empty:
                assert self.proc.poll() is None, "ferry exited early:\n" + "".join(self.stderr)
                continue
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} within {DEADLINE_S} s:\n" + "".join(self.stderr))

    def finish(self, what: str) -> int:
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{what} did not finish:\n" + "".join(self.stderr)) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def test_specforge_remote_inbox_channel_reads_a_ferry_relay(tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    inboxes = control / "consumer" / "inboxes"
    rank0 = Child(
        [
            "consume",
            "--control",
            control,
            "--store",
            f"dir://{tmp_path / 'store'}",
            "--dp",
            "3",
            "--rank",
            "0",
            "--group",
            f"unix://{tmp_path / 'group.sock'}",
            "--group-timeout",
            "120",
            "--inbox-serve",
            "http://127.0.0.1:0",
        ]
    )
    try:
        origin = rank0.wait_for_line(r"serving the rank inboxes of .* at (http://\S+)").group(1)
        inboxes.mkdir(parents=True, exist_ok=True)
        writer1 = StreamingRefChannel(RefDistributor.inbox_path(str(inboxes), 1))
        reader1 = RemoteInboxChannel(origin, 1)

        # Tail read of a 2-ref batch, then nothing new.
        writer1.publish_batch([sf_ref("s0"), sf_ref("s1")])
        assert ids(reader1.poll()) == ["s0", "s1"]
        assert reader1.poll() == []

        # Marks of 2 then 1: ferry's server counter is 3, as SpecForge's channel reads it.
        reader1.mark_consumed(2)
        reader1.mark_consumed(1)
        assert writer1.consumed_remote() == 3
        assert (inboxes / "inbox-rank1.jsonl.consumed_count").read_text() == "3"

        # A status probe keeps the ref it pulled; close is visible.
        writer1.publish(sf_ref("s2"))
        assert reader1.is_closed() is False
        assert reader1.failure() is None
        writer1.close()
        assert reader1.is_closed() is True
        assert ids(reader1.poll()) == ["s2"]

        # The distributor's failure text, with SpecForge's prefix.
        StreamingRefChannel(RefDistributor.inbox_path(str(inboxes), 0)).fail("boom: no refs for 5s")
        assert RemoteInboxChannel(origin, 0).failure() == "ref-distributor died:\nboom: no refs for 5s"

        # Twelve SpecForge clients acknowledging target 5 at once: all confirmed, counter 5.
        errors: list[BaseException] = []
        barrier = threading.Barrier(12)

        def ack() -> None:
            try:
                client = RemoteInboxChannel(origin, 0)
                barrier.wait(timeout=DEADLINE_S)
                client.mark_consumed(5)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=ack) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=DEADLINE_S)
        assert errors == []
        assert StreamingRefChannel(RefDistributor.inbox_path(str(inboxes), 0)).consumed_remote() == 5

        # An inbox larger than ferry's 4 MiB chunk cap: SpecForge's client advances by
        # next_offset over several answers and loses nothing.
        writer2 = StreamingRefChannel(RefDistributor.inbox_path(str(inboxes), 2))
        total = 0
        while total == 0 or os.path.getsize(writer2.path) <= 5 << 20:
            writer2.publish_batch([sf_ref(f"big{total + i}") for i in range(2000)])
            total += 2000
        writer2.close()
        reader2 = RemoteInboxChannel(origin, 2)
        open_answers = 0
        while not reader2.is_closed():
            open_answers += 1
            assert open_answers < 100, "no progress"
        # The first answer stopped at the cap, so `closed` waited for a later one.
        assert open_answers >= 1
        assert ids(reader2.poll()) == [f"big{i}" for i in range(total)]
    finally:
        rank0.kill()


def test_a_ferry_rank_trains_through_specforges_inbox_server(tmp_path):
    control = tmp_path / "control"
    store = f"dir://{tmp_path / 'store'}"
    producer = Child(
        ["produce", "--control", control, "--store", store, "--samples", "8", "--seq-len", "16", "--hidden", "16"]
        + ["--high-watermark", "8", "--peer-timeout", "60"]
    )
    claim = control / "refs.jsonl.producer_claim"
    deadline = time.monotonic() + DEADLINE_S
    while not claim.exists():
        assert time.monotonic() < deadline and producer.proc.poll() is None, "".join(producer.stderr)
        time.sleep(0.005)

    inboxes = control / "consumer" / "inboxes"
    inboxes.mkdir(parents=True)
    server = InboxHTTPServer(str(inboxes), 2, "http://127.0.0.1:0", bind_host="127.0.0.1").start()
    port = server._httpd.server_address[1]
    group = f"unix://{tmp_path / 'group.sock'}"
    shape = ["--dp", "2", "--batch", "2", "--accum", "1", "--idle-timeout", "60", "--group", group]
    elsewhere = tmp_path / "node1"
    ranks = []
    try:
        ranks.append(
            Child(["consume", "--control", control, "--store", store, *shape]
                  + ["--rank", "0", "--checksums", tmp_path / "rank0.jsonl"])
        )
        ranks.append(
            Child(
                ["consume", "--control", elsewhere / "control", "--state", elsewhere / "state", "--store", store]
                + [*shape, "--rank", "1", "--checksums", tmp_path / "rank1.jsonl"]
                + ["--inbox-url", f"http://127.0.0.1:{port}"]
            )
        )
        for rank, child in enumerate(ranks):
            assert child.finish(f"rank {rank}") == 0, f"rank {rank}:\n" + "".join(child.stderr)
        assert producer.finish("the producer") == 0, "".join(producer.stderr)
    finally:
        for child in [*ranks, producer]:
            child.kill()
        server.stop()

    trained = {}
    for rank in range(2):
        lines = (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()
        assert len(lines) == 4, f"rank {rank} trains half"
        for line in lines:
            sample_id = json.loads(line)["sample_id"]
            assert sample_id not in trained, "a sample trained twice"
            trained[sample_id] = rank
    assert len(trained) == 8
    # Rank 1's acknowledgements went through SpecForge's server to the counter beside its inbox.
    assert (inboxes / "inbox-rank1.jsonl.consumed_count").read_text() == "4"
    assert not (elsewhere / "state" / "inboxes").exists()
    assert (control / "refs.jsonl.consumer_done").exists()
