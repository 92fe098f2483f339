"""Collectives for ``ferry.OnlineRank`` written in Python.

A collective is any object with ``rank``, ``world_size`` and ``all_gather(part: bytes) ->
list[bytes]`` (every rank's part, in rank order), optionally ``abandon()`` (leave the group
after a local failure so peers fail at once). ferry calls ``all_gather`` at rank-0 setup and
at every optimizer boundary, from the thread that calls ``OnlineRank``'s methods, holding the
GIL only for that call. A ``ConnectionError`` raised by it means a lost peer (the attempt is
resumable: nothing terminal is published); any other exception fails the consumer.

``ferry.SocketCollective`` (native, no torch) and ``TorchCollective`` (below) are the two
ready-made ones.
"""

from __future__ import annotations

from typing import Any


class TorchCollective:
    """The collective over ``torch.distributed``'s default (or a given) process group, so a
    trainer reuses the group it already initialized: ``all_gather`` is
    ``torch.distributed.all_gather_object`` of the bytes.

    ``torch.distributed.init_process_group`` must have run first. With NCCL, make sure the
    current CUDA device is this rank's (``torch.cuda.set_device``), as ``all_gather_object``
    requires; a gloo group (``torch.distributed.new_group(backend="gloo")``) passed as
    ``group`` keeps these small control messages off the GPU.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist  # torch is optional for ferry: imported on use

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCollective needs an initialized torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        self._dist = dist
        self._group = group
        self.rank: int = dist.get_rank(group=group)
        self.world_size: int = dist.get_world_size(group=group)

    def all_gather(self, part: bytes) -> list[bytes]:
        """Every rank's ``part``, in rank order."""
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, bytes(part), group=self._group)
        return [bytes(p) for p in out]

    def abandon(self) -> None:
        """Nothing to do: torch has no way to leave a group; peers fail on their own timeout."""

    def __repr__(self) -> str:
        return f"TorchCollective(rank={self.rank}, world_size={self.world_size})"


class LocalCollective:
    """A one-rank collective (``world_size == 1``): ``all_gather`` returns ``[part]``."""

    rank = 0
    world_size = 1

    def all_gather(self, part: bytes) -> list[bytes]:
        return [bytes(part)]

    def __repr__(self) -> str:
        return "LocalCollective()"
