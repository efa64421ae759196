"""`python -m engine.train [--config FILE] key=value ...`: the training entry point (also for torchrun)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
