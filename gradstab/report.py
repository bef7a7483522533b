"""Alias of :mod:`gradstab.tools.report` (the report command moved): old imports keep working."""

import sys

from gradstab.tools import report as _target

sys.modules[__name__] = _target
