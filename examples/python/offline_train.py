#!/usr/bin/env python3
"""Offline draft-model training from a hidden-state dump with ferry's loader (CPU, PyTorch).

The data side is three lines::

    refs = ferry.offline_refs(dump)                        # lazy file:// refs, SpecForge's order
    loader = ferry.FeatureLoader(ferry.open_store("mem://train"), refs, batch_size=2,
                                 dp=world_size, rank=rank, seed=0)
    for batch in loader: train_step(batch.to_torch())      # torch tensors over ferry's buffers

The model is a toy EAGLE3-shaped head: a linear map from the target's auxiliary hidden states
(``hidden_state``, (B, L, 3H) after EAGLE3's offline role swap) to its last hidden state
(``target``, (B, L, H)), trained with a mean-squared error over the tokens the loss mask and the
attention mask keep. It only shows the data path; it is not a draft model.

Under ``torchrun --nproc-per-node N`` each process reads its ``DistributedSampler``-equal
shard (``RANK``, ``WORLD_SIZE`` from the environment) and gradients are averaged with gloo.

    python examples/python/offline_train.py [DUMP] [--epochs 2] [--batch-size 2]
    ferry synth /tmp/dump --samples 64 --seq-len 256 && python examples/python/offline_train.py /tmp/dump

DUMP defaults to SpecForge's EAGLE3 fixture dump (``../shared/fixtures/specforge-offline-eagle3``
beside the repository). Needs numpy, torch and the ``ferry`` package.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ferry

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DUMP = REPO.parent / "shared" / "fixtures" / "specforge-offline-eagle3"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dump", nargs="?", default=str(DEFAULT_DUMP), help="offline dump (.ckpt files) or a manifest")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-len", type=int, default=None, help="cut samples to this many tokens")
    p.add_argument("--workers", type=int, default=1, help="loader prefetch threads (0: read inline)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0, help="the DP sampler's seed (the same on every rank)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)

    # The data: refs from the dump (or a manifest `ferry ingest` wrote), read in place.
    path = Path(args.dump)
    refs = ferry.read_manifest(path) if path.suffix == ".json" else ferry.offline_refs(path)
    store = ferry.open_store("mem://offline-train", retain_on_release=True)
    dp = {"dp": world, "rank": rank, "seed": args.seed} if world > 1 else {}
    loader = ferry.FeatureLoader(
        store, refs, batch_size=args.batch_size, drop_last=False, num_workers=args.workers,
        max_len=args.max_len, **dp,
    )

    model: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)  # a new DP shard order per epoch, as DistributedSampler.set_epoch
        start, losses, tokens = time.perf_counter(), [], 0
        for batch in loader:
            t = batch.to_torch()  # no copy: torch tensors over ferry's batch buffers
            x = t["hidden_state"].float()  # (B, L, 3H): the target's auxiliary hidden states
            y = t["target"].float()  # (B, L, H): its last hidden state
            keep = (t["loss_mask"] * t["attention_mask"]).float().unsqueeze(-1)  # (B, L, 1)
            if model is None:
                model = torch.nn.Linear(x.shape[-1], y.shape[-1])
                if world > 1:
                    model = torch.nn.parallel.DistributedDataParallel(model)
                opt = torch.optim.SGD(model.parameters(), lr=args.lr)
            assert opt is not None
            err = (model(x) - y) ** 2 * keep
            loss = err.sum() / (keep.sum() * y.shape[-1]).clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens += int(t["attention_mask"].sum())
        mean = sum(losses) / max(len(losses), 1)
        print(
            f"rank {rank}/{world} epoch {epoch}: {len(losses)} batches, {tokens} tokens, "
            f"mean loss {mean:.4f}, {time.perf_counter() - start:.2f} s",
            flush=True,
        )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
