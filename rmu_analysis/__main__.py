"""``python -m rmu_analysis ...``: the same as the ``rmu-analysis`` command (for environments without the script)."""
import sys

from .cli import main

sys.exit(main())
