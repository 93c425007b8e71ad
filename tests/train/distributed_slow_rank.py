"""A real training run under torchrun in which every rank but 0 reaches the output-dir check late.

``python -m torch.distributed.run --nproc_per_node N distributed_slow_rank.py CONFIG.yaml``: rank 0
gets a head start, so it has written the run's ``config.yaml`` by the time the others look, unless
the loop makes it wait for them. The others must not take that file for an earlier run. Each rank
writes what ``train()`` returned to ``returned_by_rank<r>.json`` beside the config.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mmsphere.train.config import load_config
from mmsphere.train import loop

HEAD_START_SECONDS = 3.0


def main(config_path: str) -> None:
    check_output_dir = loop.check_output_dir

    def late_check(config):
        if int(os.environ["RANK"]) > 0:
            time.sleep(HEAD_START_SECONDS)
        return check_output_dir(config)

    loop.check_output_dir = late_check
    summary = loop.train(load_config(config_path, []))
    (Path(config_path).parent / f"returned_by_rank{os.environ['RANK']}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
