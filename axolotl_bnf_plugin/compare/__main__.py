"""`python -m axolotl_bnf_plugin.compare config.yml --methods dpo bnf asft` (see `run.py`)."""
import sys

from .run import main

sys.exit(main())
