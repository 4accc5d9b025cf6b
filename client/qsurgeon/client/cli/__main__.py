"""``python -m qsurgeon.client.cli``: the same as the ``qsurgeon`` command."""

import sys

from qsurgeon.client.cli import main

sys.exit(main())
