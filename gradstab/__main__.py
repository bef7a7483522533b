"""``python -m gradstab``: runs :func:`gradstab.tools.cli.main`."""

import sys

from gradstab.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
