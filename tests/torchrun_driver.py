"""``predet`` under torchrun with a spy on the writes that must happen once (tests only).

Usage: ``torchrun ... tests/torchrun_driver.py SPY_FILE predet-args...``. Every call of
``write_subset`` appends the calling rank to SPY_FILE; then the CLI runs as a user's would.
"""

import os
import sys

import predet.finetune as finetune_module
from predet.cli import main

spy, argv = sys.argv[1], sys.argv[2:]
real_write_subset = finetune_module.write_subset


def write_subset_spied(*args, **kwargs):
    with open(spy, "a") as f:
        f.write(os.environ.get("RANK", "0") + "\n")
    return real_write_subset(*args, **kwargs)


finetune_module.write_subset = write_subset_spied
sys.exit(main(argv))
