"""Alias of :mod:`gradstab.tools.demo`, where the demo moved: old imports keep working."""

import sys

from gradstab.tools import demo as _target

sys.modules[__name__] = _target
