"""``python -m device`` is ``fleet-device``."""

import sys

from device.cli import main

sys.exit(main())
