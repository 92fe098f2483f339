#!/usr/bin/env python3
"""Write tests/data/torch_randperm.json: reference outputs of real torch for ferry's sampler.

ferry-loader reimplements torch's CPU ``randperm`` (ATen's MT19937 ``CPUGeneratorImpl`` and
``randperm_cpu``) and ``torch.utils.data.DistributedSampler`` so DP shards equal SpecForge's.
Run this on a machine with torch installed, then ``cargo test -p ferry-loader --test
torch_randperm`` compares every case (the test skips with a note while the file is absent).

    python3 crates/ferry-loader/tests/gen_torch_randperm.py [output.json]

Cases (a JSON list; every case also records the torch version that wrote it):
  {"torch": "2.x", "n": N, "seed": S, "perm": [...]}
      g = torch.Generator(); g.manual_seed(S); torch.randperm(N, generator=g).tolist()
  {"torch": "2.x", "n": N, "seed": S,
   "sampler": {"num_replicas": DP, "rank": R, "epoch": E, "shuffle": B, "drop_last": B},
   "indices": [...]}
      list(DistributedSampler(range(N), num_replicas=DP, rank=R, shuffle=B, seed=S,
                              drop_last=B)) after set_epoch(E)
"""

import json
import os
import sys

import torch
from torch.utils.data import DistributedSampler

RANDPERM_NS = [1, 2, 3, 7, 10, 100, 1000, 5000]
RANDPERM_SEEDS = [0, 1, 42, 1234567]
SAMPLER_NS = [1, 2, 7, 10, 100, 1001]
SAMPLER_SEEDS = [0, 42, 1234567]
SAMPLER_DPS = [2, 3]
SAMPLER_EPOCHS = [0, 1]
# (shuffle, drop_last): SpecForge's setting first, then the variants ferry also offers.
SAMPLER_MODES = [(True, False), (False, False), (True, True)]


def randperm_cases():
    for n in RANDPERM_NS:
        for seed in RANDPERM_SEEDS:
            g = torch.Generator()
            g.manual_seed(seed)
            perm = torch.randperm(n, generator=g).tolist()
            yield {"torch": torch.__version__, "n": n, "seed": seed, "perm": perm}


def sampler_cases():
    for n in SAMPLER_NS:
        for seed in SAMPLER_SEEDS:
            for dp in SAMPLER_DPS:
                for epoch in SAMPLER_EPOCHS:
                    for shuffle, drop_last in SAMPLER_MODES:
                        for rank in range(dp):
                            sampler = DistributedSampler(
                                range(n),
                                num_replicas=dp,
                                rank=rank,
                                shuffle=shuffle,
                                seed=seed,
                                drop_last=drop_last,
                            )
                            sampler.set_epoch(epoch)
                            yield {
                                "torch": torch.__version__,
                                "n": n,
                                "seed": seed,
                                "sampler": {
                                    "num_replicas": dp,
                                    "rank": rank,
                                    "epoch": epoch,
                                    "shuffle": shuffle,
                                    "drop_last": drop_last,
                                },
                                "indices": [int(i) for i in sampler],
                            }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "data", "torch_randperm.json")
    cases = list(randperm_cases()) + list(sampler_cases())
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cases, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, out)
    print(f"wrote {len(cases)} cases from torch {torch.__version__} to {out}")


if __name__ == "__main__":
    main()
