"""Entry point for `python -m spatial_entropy` (and `torchrun -m spatial_entropy`)."""

from spatial_entropy.cli import main

raise SystemExit(main())
