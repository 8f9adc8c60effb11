"""``python -m edgeslim.deploy.agent``."""

import sys

from edgeslim.deploy.agent.device import main

sys.exit(main())
