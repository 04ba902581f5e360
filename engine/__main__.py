"""`python -m engine`: the `loom` command."""
import sys

from .cli import main

sys.exit(main())
