#!/usr/bin/env python3
"""Online disaggregated training from Python: a tiny PyTorch model on CPU trained from samples a
producer publishes while training runs, each optimizer step durably acknowledged.

The consumer side is the loop a trainer writes::

    with ferry.OnlineRank(config, ferry.TorchCollective(), store) as rank:
        for step in rank:                     # the micro-batches of one optimizer step
            for micro_batch in step:          # lists of SampleRef
                loss(read(micro_batch)).backward()
            optimizer.step()
            rank.commit_step()                # the durable DP ack, then the inbox ack
    # leaving the block: drain, agree, .consumer_done (or .consumer_failed on an exception)

The producer side stands in for a capture server (an SGLang hook): it claims the channel, then
``Producer.put_and_publish`` stores each sample and publishes its ref, blocking while the
flow-control watermarks say the consumer is behind.

Here rank 0 runs everything the consumer needs besides the trainers: a node daemon (the
store, retaining bytes until the durable ack deletes them) and the producer, on a thread. Run
it alone (one rank, a one-process gloo group) or under ``torchrun --nproc-per-node N`` (the
ranks reach the daemon through its Unix socket and agree through ``torch.distributed``).

    python examples/python/online_consumer.py [--workdir DIR] [--samples 96]
    torchrun --nproc-per-node 2 examples/python/online_consumer.py --workdir /tmp/ferry-online

Needs numpy, torch and the ``ferry`` package.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import ferry

DIM, CLASSES = 16, 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="control, state and socket directory (default: a temp dir)")
    p.add_argument("--samples", type=int, default=96, help="samples the producer publishes")
    p.add_argument("--batch-size", type=int, default=4, help="refs per rank per micro-batch")
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=5e-2)
    return p.parse_args()


def synthetic_sample(i: int) -> dict[str, np.ndarray]:
    """A separable toy sample: a hidden state whose class is the argmax of its first entries."""
    rng = np.random.default_rng(i)
    label = i % CLASSES
    hidden = rng.normal(size=DIM).astype(np.float32)
    hidden[label] += 3.0
    return {"hidden_state": hidden, "target": np.array([label], dtype=np.int64)}


def produce(producer: ferry.Producer, samples: int) -> None:
    """The capture server's side: store and publish each sample under flow control."""
    try:
        for i in range(samples):
            producer.put_and_publish(f"demo:s{i:06d}", synthetic_sample(i), {"run_id": "demo"})
        report = producer.finish()  # EOF, wait for the consumer's end, clean up
        print(f"producer: published {report['published']}, paused {report['pause_transitions']} times", flush=True)
    except BaseException as e:
        producer.fail(e)
        raise


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ferry-online-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if "WORLD_SIZE" in os.environ:  # torchrun
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method=f"file://{workdir / 'torch-pg'}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()

    control, state, socket = workdir / "control", workdir / "state", workdir / "ferry.sock"
    config = ferry.ConsumerConfig(
        "demo",
        control / "refs.jsonl",
        state / "inboxes",
        state / "consumer.sqlite",
        dp_size=world,
        batch_size=args.batch_size,
        accumulation=args.accumulation,
        idle_timeout_s=120,
        poll_s=0.01,
    )
    daemon = producer_thread = None
    if rank == 0:
        daemon = ferry.start_daemon(listen=None, socket=str(socket), retain_on_release=True)
        # The producer claims the channel before the consumer publishes its quantum.
        producer_store = ferry.open_store(daemon.unix_uri, owning=True)
        window = config.quantum
        producer = ferry.Producer(
            config.channel, producer_store, high_watermark=2 * window, low_watermark=window, peer_timeout_s=120
        )
        producer_thread = threading.Thread(target=produce, args=(producer, args.samples), name="producer")
        producer_thread.start()
    dist.barrier()  # the daemon listens
    store = ferry.open_store(f"ferry+unix://{socket}")

    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    started = time.perf_counter()
    with ferry.OnlineRank(config, ferry.TorchCollective(), store) as online:
        for step in online:
            optimizer.zero_grad()
            losses = []
            for micro_batch in step:
                hidden, target = [], []
                for ref in micro_batch:
                    with store.get(ref) as sample:  # arrays own their memory: valid after the lease
                        hidden.append(torch.from_numpy(sample["hidden_state"]))
                        target.append(torch.from_numpy(sample["target"]))
                loss = torch.nn.functional.cross_entropy(model(torch.stack(hidden)), torch.cat(target))
                (loss / len(step)).backward()
                losses.append(loss.item())
            for p in model.parameters():  # data-parallel gradient average
                if world > 1:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            optimizer.step()
            global_step = online.commit_step()  # only now are the step's samples acked and deleted
            if rank == 0:
                print(f"step {global_step}: loss {sum(losses) / len(losses):.4f}", flush=True)
        report = online.finish()
    elapsed = time.perf_counter() - started

    if rank == 0:
        producer_thread.join(120)
        with sqlite3.connect(f"file:{config.ledger}?mode=ro", uri=True) as con:
            (acked,) = con.execute("SELECT COUNT(*) FROM acked").fetchone()
        print(f"rank 0: {report['steps']} optimizer steps in {elapsed:.2f} s; acked {acked} samples", flush=True)
    store.close()
    dist.barrier()
    if daemon is not None:
        daemon.stop()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
