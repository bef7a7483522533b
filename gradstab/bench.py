"""Alias of :mod:`gradstab.tools.bench`, where the benchmark moved: old imports keep working."""

import sys

from gradstab.tools import bench as _target

sys.modules[__name__] = _target
