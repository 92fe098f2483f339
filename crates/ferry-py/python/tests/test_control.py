"""The control plane from Python: ref channels (byte-compatible with SpecForge's), collectives,
the online consumer (`OnlineRank`) and the capture-server producer (`Producer`), including a
two-process online run whose every sample is acknowledged exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import ferry

REPO = Path(__file__).resolve().parents[4]
SUBPROCESS_TIMEOUT = 120


# --- channels ----------------------------------------------------------------------------------


def test_channel_round_trip_is_byte_compatible_with_specforge(fixtures_dir, tmp_path):
    src = fixtures_dir / "specforge-control"
    for name in ("refs.jsonl", "refs.jsonl.closed", "refs.jsonl.consumed_count", "refs.jsonl.consumer_quantum"):
        shutil.copy(src / name, tmp_path / name)
    raw = (tmp_path / "refs.jsonl").read_bytes()
    # The fixture ends with a torn record (a writer died mid-append): readers never return it.
    original = raw[: raw.rindex(b"\n") + 1]
    assert raw != original
    reader = ferry.RefChannel(tmp_path / "refs.jsonl")
    refs = reader.poll()
    assert len(refs) == original.count(b"\n") and all(isinstance(r, ferry.SampleRef) for r in refs)
    assert reader.poll() == [], "an instance reads each record once"
    state = reader.state()
    assert state["closed"] and state["failed"] is None and not state["consumer_done"]
    assert state["consumed_count"] == int((src / "refs.jsonl.consumed_count").read_text().strip())
    assert state["consumer_quantum"] == int((src / "refs.jsonl.consumer_quantum").read_text().strip())
    assert reader.is_closed() and reader.consumer_quantum() == state["consumer_quantum"]

    (tmp_path / "out").mkdir()  # like SpecForge's, a channel does not create its directory
    batch = ferry.RefChannel(tmp_path / "out" / "batch.jsonl")
    batch.publish(refs)
    one_by_one = ferry.RefChannel(tmp_path / "out" / "single.jsonl")
    for r in refs:
        one_by_one.publish(r)
    assert batch.published == one_by_one.published == len(refs)
    assert (tmp_path / "out" / "batch.jsonl").read_bytes() == original
    assert (tmp_path / "out" / "single.jsonl").read_bytes() == original

    records = ferry.RefChannel(tmp_path / "refs.jsonl").poll_records(max=2)
    lines = original.decode().splitlines()
    assert records == [(refs[0].sample_id, lines[0]), (refs[1].sample_id, lines[1])]
    lines_out = ferry.RefChannel(tmp_path / "out" / "lines.jsonl")
    lines_out.publish_lines(lines)
    assert (tmp_path / "out" / "lines.jsonl").read_bytes() == original


def test_channel_sidecars_both_directions(tmp_path):
    path = tmp_path / "refs.jsonl"
    producer, consumer = ferry.RefChannel(path), ferry.RefChannel(path)
    store = ferry.open_store(f"mem://c{uuid.uuid4().hex[:8]}")
    refs = [store.put(f"run0:s{i}", {"x": np.arange(3)}) for i in range(3)]
    producer.publish(refs)
    assert [r.sample_id for r in consumer.poll(max=2)] == ["run0:s0", "run0:s1"]
    assert [r.sample_id for r in consumer.poll()] == ["run0:s2"]
    consumer.mark_consumed(2)
    assert consumer.consumed == 2 and producer.consumed_remote() == 2 and producer.in_flight_remote() == 1
    assert ferry.RefChannel(path).seed_consumed() == 2
    assert producer.consumer_quantum() is None
    consumer.publish_consumer_quantum(4)
    with pytest.raises(ferry.InvalidArgumentError):
        consumer.publish_consumer_quantum(8, allow_existing=True)
    consumer.publish_consumer_quantum(4, allow_existing=True)
    assert producer.consumer_quantum() == 4
    assert not producer.consumer_stopped() and producer.consumer_failure() is None
    consumer.mark_consumer_failed("RuntimeError: boom")
    assert producer.consumer_stopped() and producer.consumer_failure() == "RuntimeError: boom"
    producer.mark_failed("ValueError: bad prompt")
    assert consumer.failure() == "ValueError: bad prompt"
    producer.close()
    assert consumer.is_closed()
    state = consumer.state()
    assert state == {
        "closed": True,
        "failed": "ValueError: bad prompt",
        "consumed_count": 2,
        "consumer_done": False,
        "consumer_failed": "RuntimeError: boom",
        "consumer_quantum": 4,
    }
    inbox = ferry.RefChannel.inbox(tmp_path / "inboxes", 1)
    assert inbox.path == tmp_path / "inboxes" / "inbox-rank1.jsonl"


def test_socket_collective_gathers_in_rank_order(tmp_path):
    address = f"unix://{tmp_path / 'g.sock'}"
    results: dict[int, object] = {}

    def rank(r: int) -> None:
        try:
            g = ferry.SocketCollective(address, r, 3, timeout_s=20)
            results[r] = (g.all_gather(f"part{r}".encode()), g.broadcast_from_rank0(bytes([r])))
        except BaseException as e:  # reported below
            results[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r in range(3):
        assert results[r] == ([b"part0", b"part1", b"part2"], b"\x00"), results[r]


# --- one process: producer and consumer threads ---------------------------------------------------


def _dirs(tmp_path: Path, dp: int = 1, batch: int = 2, accumulation: int = 1, **kw) -> ferry.ConsumerConfig:
    return ferry.ConsumerConfig(
        "run0",
        tmp_path / "control" / "refs.jsonl",
        tmp_path / "inboxes",
        tmp_path / "state" / "consumer.sqlite",
        dp_size=dp,
        batch_size=batch,
        accumulation=accumulation,
        poll_s=0.01,
        **kw,
    )


def _acked(ledger: Path) -> list[str]:
    con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return [row[0] for row in con.execute("SELECT sample_id FROM acked")]
    finally:
        con.close()


def test_consumer_config_fields_and_quantum(tmp_path):
    c = _dirs(tmp_path, dp=2, batch=3, accumulation=4, idle_timeout_s=5.0)
    assert (c.dp_size, c.batch_size, c.accumulation, c.refs_per_rank_step, c.quantum) == (2, 3, 4, 12, 24)
    assert c.idle_timeout_s == 5.0 and c.checkpoint_step == 0 and not c.resume
    with pytest.raises(ferry.InvalidArgumentError):
        _dirs(tmp_path, batch=0)


@pytest.mark.usefixtures("ctrl_c")
def test_a_paused_producer_resumes_after_acks(tmp_path):
    store = ferry.open_store(f"mem://p{uuid.uuid4().hex[:8]}", retain_on_release=True)
    config = _dirs(tmp_path)  # quantum 2
    producer = ferry.Producer(config.channel, store, high_watermark=4, low_watermark=2, peer_timeout_s=30, poll_s=0.01)
    rank = ferry.OnlineRank(config, ferry.LocalCollective(), store)  # a Python collective
    assert producer.wait_for_quantum() == 2
    for i in range(4):
        assert producer.put_and_publish(f"run0:s{i}", {"x": np.full(4, i, dtype=np.int32)}) is not None
    blocked = threading.Thread(target=producer.put_and_publish, args=("run0:s4", {"x": np.full(4, 4, dtype=np.int32)}))
    blocked.start()
    time.sleep(0.4)
    assert blocked.is_alive() and producer.paused and producer.published == 4, "paused at the high watermark"
    with pytest.raises(ferry.TimeoutError, match="drain"):
        producer.wait_for_room(timeout=0.2)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        producer.wait_for_room()  # Ctrl-C interrupts a paused producer's wait
    assert producer.in_flight() == (4, 4 * 16)
    step = rank.next_step()
    assert [[r.sample_id for r in mb] for mb in step] == [["run0:s0", "run0:s1"]]
    assert rank.commit_step() == 1
    blocked.join(10)
    assert not blocked.is_alive() and producer.published == 5, "resumed once in flight fell to the low watermark"
    producer.put_and_publish("run0:s5", {"x": np.full(4, 5, dtype=np.int32)})
    producer.close()
    seen = []
    for step in rank:
        for mb in step:
            for r in mb:
                with store.get(r) as lease:
                    seen.append((r.sample_id, int(lease["x"][0])))
        rank.commit_step()
    assert seen == [(f"run0:s{i}", i) for i in range(2, 6)]
    assert rank.finish() == {"steps": 3, "refs": 6, "global_step": 3}
    report = producer.finish(timeout=10)
    assert report["published"] == 6 and report["pause_transitions"] >= 1 and report["resume_transitions"] >= 1
    assert producer.consumed() == 6
    assert sorted(_acked(config.ledger)) == sorted(f"run0:s{i}" for i in range(6))
    assert store.health()["resident_samples"] == 0
    assert ferry.RefChannel(config.channel).state()["consumer_done"]


def test_a_consumer_failure_reaches_the_producer(tmp_path):
    store = ferry.open_store(f"mem://f{uuid.uuid4().hex[:8]}", retain_on_release=True)
    config = _dirs(tmp_path)
    producer = ferry.Producer(config.channel, store, high_watermark=8, peer_timeout_s=30, poll_s=0.01)
    with pytest.raises(RuntimeError, match="boom in train"):
        with ferry.OnlineRank(config, ferry.LocalCollective(), store) as rank:
            producer.put_and_publish("run0:a", {"x": np.zeros(2)})
            producer.put_and_publish("run0:b", {"x": np.zeros(2)})
            assert len(rank.next_step()[0]) == 2
            raise RuntimeError("boom in train")
    assert rank.status == "failed"
    assert ferry.RefChannel(config.channel).consumer_failure() == "RuntimeError: boom in train"
    with pytest.raises(ferry.PeerFailedError, match="consumer") as caught:
        producer.put_and_publish("run0:c", {"x": np.zeros(2)})
    assert "boom in train" in str(caught.value)
    producer.fail(caught.value)
    assert "boom in train" in ferry.RefChannel(config.channel).failure(), "the producer's .failed says why"
    assert store.health()["resident_samples"] == 0


@pytest.mark.usefixtures("ctrl_c")
def test_next_step_is_interruptible_and_resumable(tmp_path):
    store = ferry.open_store(f"mem://i{uuid.uuid4().hex[:8]}", retain_on_release=True)
    config = _dirs(tmp_path, batch=1, accumulation=2)
    producer = ferry.Producer(config.channel, store, high_watermark=8, peer_timeout_s=30, poll_s=0.01)
    rank = ferry.OnlineRank(config, ferry.LocalCollective(), store)
    producer.put_and_publish("run0:a", {"x": np.zeros(2)})
    timer = threading.Timer(0.4, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        rank.next_step()  # one ref of a two-ref step: waits
    assert time.monotonic() - started < 5
    producer.put_and_publish("run0:b", {"x": np.zeros(2)})
    step = rank.next_step()
    assert [[r.sample_id for r in mb] for mb in step] == [["run0:a"], ["run0:b"]], "the leased ref was put back"
    rank.commit_step()
    producer.close()
    assert rank.next_step() is None and rank.status == "ended"
    rank.finish()
    producer.finish(timeout=10)


def test_a_lost_peer_publishes_nothing_terminal(tmp_path):
    store = ferry.open_store(f"mem://l{uuid.uuid4().hex[:8]}", retain_on_release=True)
    config = _dirs(tmp_path, dp=2, batch=1)  # quantum 2
    producer = ferry.Producer(config.channel, store, high_watermark=8, peer_timeout_s=30, poll_s=0.01)
    address = f"unix://{tmp_path / 'g.sock'}"
    out: dict[int, object] = {}

    def rank(r: int) -> None:
        try:
            collective = ferry.SocketCollective(address, r, 2, timeout_s=20)
            online = ferry.OnlineRank(config, collective, store)
            step = online.next_step()
            if r == 1:
                collective.abandon()  # the process "dies": its connection to rank 0 closes
                out[r] = step
                return
            online.commit_step()
            out[r] = "committed"
        except BaseException as e:
            out[r] = (e, online.status)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    producer.put_and_publish("run0:a", {"x": np.zeros(2)})
    producer.put_and_publish("run0:b", {"x": np.zeros(2)})
    for t in threads:
        t.join(30)
    error, status = out[0]
    assert isinstance(error, ferry.PeerLostError) and status == "failed", out[0]
    state = ferry.RefChannel(config.channel).state()
    assert state["consumer_failed"] is None and not state["consumer_done"], "a crash is resumable: nothing terminal"
    producer.fail("test over")


def test_external_attempts_are_tracked_adopted_and_discarded():
    store = ferry.open_store(f"mem://x{uuid.uuid4().hex[:8]}")
    store.track_external_attempt("run0:ext", 1, ["hidden_state"])
    assert store.discard_external_attempts() == 1
    assert store.discard_external_attempts() == 0
    r = store.put("run0:mine", {"x": np.zeros(2)})
    store.disown([r.sample_id])
    store.adopt(r)
    with pytest.raises(ferry.InvalidArgumentError):
        store.track_external_attempt("run0:none", 1, [])


def test_producer_refuses_watermarks_below_the_quantum_and_a_used_channel(tmp_path):
    store = ferry.open_store(f"mem://w{uuid.uuid4().hex[:8]}", retain_on_release=True)
    config = _dirs(tmp_path, batch=4)
    producer = ferry.Producer(config.channel, store, high_watermark=2, peer_timeout_s=10, poll_s=0.01)
    with pytest.raises(ferry.InvalidArgumentError, match="claimed|earlier attempt"):
        ferry.Producer(config.channel, store)
    rank = ferry.OnlineRank(config, ferry.LocalCollective(), store)
    with pytest.raises(ferry.InvalidArgumentError, match="quantum"):
        producer.put_and_publish("run0:a", {"x": np.zeros(2)})
    rank.fail("test over")
    producer.fail("test over")


# --- two processes: an online run over a daemon ------------------------------------------------

DAEMON = r"""
import json, sys
import ferry
d = ferry.start_daemon(listen=None, socket=sys.argv[1], secret=sys.argv[2], retain_on_release=True)
print(json.dumps({"unix": d.unix_uri}), flush=True)
sys.stdin.read()
d.stop()
"""

PRODUCER = r"""
import json, sys
import numpy as np
import ferry
uri, secret, channel, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = ferry.open_store(uri, secret=secret, owning=True, bfloat16="uint16")  # no ml_dtypes import
with ferry.Producer(channel, store, high_watermark=12, low_watermark=8, peer_timeout_s=60, poll_s=0.01) as p:
    print("claimed", flush=True)
    for i in range(n):
        tokens = np.arange(8, dtype=np.int64) + i
        p.put_and_publish(f"run0:s{i:04d}", {"input_ids": tokens, "hidden": np.full((8, 4), i, np.float32)},
                          {"run_id": "run0"})
    report = p.finish()
print(json.dumps({"report": report, "consumed": p.consumed()}), flush=True)
"""

CONSUMER = r"""
import json, sys
import numpy as np
import ferry
uri, secret, group, rank, control, state = sys.argv[1:7]
rank = int(rank)
collective = ferry.SocketCollective(group, rank, 2, timeout_s=60)


class Wrapped:  # a collective written in Python (rank 1 uses it: ferry calls back into Python)

    def __init__(self, inner):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.calls = 0

    def all_gather(self, part):
        self.calls += 1
        return self.inner.all_gather(part)


if rank == 1:
    collective = Wrapped(collective)
store = ferry.open_store(uri, secret=secret, bfloat16="uint16")  # no ml_dtypes import
config = ferry.ConsumerConfig("run0", control + "/refs.jsonl", state + "/inboxes", state + "/consumer.sqlite",
                              dp_size=2, batch_size=2, accumulation=2, idle_timeout_s=60, poll_s=0.01)
trained = []
with ferry.OnlineRank(config, collective, store) as r:
    for step in r:
        assert len(step) == 2 and all(len(mb) == 2 for mb in step)
        for mb in step:
            for ref in mb:
                with store.get(ref) as sample:
                    i = int(ref.sample_id.split(":s")[1])
                    assert sample["input_ids"][0] == i and sample["hidden"][0, 0] == i
                trained.append(ref.sample_id)
        r.commit_step()
    report = r.finish()
calls = collective.calls if rank == 1 else None
print(json.dumps({"rank": rank, "trained": trained, "report": report, "python_calls": calls}), flush=True)
"""


def _spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, what: str) -> dict:
    try:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what} did not finish in {SUBPROCESS_TIMEOUT} s:\n{out}\n{err}")
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{out}\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def test_two_process_online_run_acks_every_sample_exactly_once(tmp_path):
    n = 32  # four optimizer steps of dp 2 x batch 2 x accumulation 2
    secret = uuid.uuid4().hex
    sock_dir = Path(f"/tmp/ferry-ctl-{uuid.uuid4().hex[:8]}")  # short: Unix socket paths are limited
    sock_dir.mkdir()
    control, state = tmp_path / "control", tmp_path / "state"
    daemon = _spawn(DAEMON, sock_dir / "d.sock", secret)
    procs: list[subprocess.Popen] = [daemon]
    try:
        line = daemon.stdout.readline()
        assert line, f"the daemon exited: {daemon.communicate(timeout=10)}"
        uri = json.loads(line)["unix"]
        producer = _spawn(PRODUCER, uri, secret, control / "refs.jsonl", n)
        procs.append(producer)
        assert producer.stdout.readline().strip() == "claimed", producer.communicate(timeout=10)
        group = f"unix://{sock_dir / 'g.sock'}"
        ranks = [_spawn(CONSUMER, uri, secret, group, r, control, state) for r in range(2)]
        procs.extend(ranks)
        results = [_finish(p, f"consumer rank {r}") for r, p in enumerate(ranks)]
        produced = _finish(producer, "producer")

        trained = results[0]["trained"] + results[1]["trained"]
        assert sorted(trained) == [f"run0:s{i:04d}" for i in range(n)], "every sample trained once, by one rank"
        assert all(r["report"] == {"steps": 4, "refs": 16, "global_step": 4} for r in results)
        assert results[1]["python_calls"] >= 1 + 4 * 3 + 1, "setup, 3 rounds per durable ack, finish"
        acked = _acked(state / "consumer.sqlite")
        assert len(acked) == n and sorted(acked) == sorted(trained), "the ledger acked each sample exactly once"
        assert produced["report"]["published"] == n and produced["consumed"] == n
        assert produced["report"]["max_in_flight"] <= 12
        channel = ferry.RefChannel(control / "refs.jsonl").state()
        assert channel["closed"] and channel["consumer_done"] and channel["consumer_failed"] is None
        assert channel["consumed_count"] == n and channel["consumer_quantum"] == 8
        with ferry.open_store(uri, secret=secret) as store:
            health = store.health()
            assert health["resident_samples"] == 0, health
    finally:
        for p in procs:
            if p.poll() is None:
                if p is daemon:
                    p.stdin.close()
                    try:
                        p.wait(timeout=10)
                        continue
                    except subprocess.TimeoutExpired:
                        pass
                p.kill()
                p.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)


# --- the PyTorch example -----------------------------------------------------------------------


def test_online_consumer_example_trains_a_tiny_model(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed: the PyTorch online example is skipped")
    example = REPO / "examples" / "python" / "online_consumer.py"
    proc = subprocess.run(
        [sys.executable, str(example), "--workdir", str(tmp_path), "--samples", "24"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "acked 24 samples" in proc.stdout
