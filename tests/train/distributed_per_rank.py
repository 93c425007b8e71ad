"""``mmsphere train`` under a launcher, each process with overrides of its own: what nodes that see different files do.

``accelerate launch --multi_gpu --num_processes N distributed_per_rank.py CONFIG.yaml RANK0 RANK1 ...``, where
``RANKi`` is a JSON list of ``dotted.key=value`` overrides for process i.
"""

from __future__ import annotations

import json
import os
import sys

from mmsphere.train.cli import main

if __name__ == "__main__":
    config_path, *per_process = sys.argv[1:]
    sys.exit(main(["--config", config_path, *json.loads(per_process[int(os.environ["RANK"])])]))
