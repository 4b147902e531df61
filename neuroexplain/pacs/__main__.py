"""``python -m neuroexplain.pacs``: the same as ``neuroexplain pacs-bridge``."""

import sys

from neuroexplain.cli.commands.pacs_bridge import main

sys.exit(main())
