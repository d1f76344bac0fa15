"""`python -m dsv4.train ARGS` = `dsv4 train ARGS`: the module torchrun starts on every rank
(`torchrun --nproc_per_node N -m dsv4.train --out RUN --steps S`)."""

import sys

from dsv4.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
