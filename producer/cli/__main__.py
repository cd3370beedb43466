"""``python -m producer.cli``: the ``atelier`` command."""

import sys

from producer.cli.main import main

sys.exit(main())
