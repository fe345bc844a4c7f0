"""``python -m paser``: the CLI, also as launchers run it (``accelerate launch -m paser select ...``,
``torchrun --nproc-per-node 2 -m paser select ...``)."""

from .cli import main

main()
