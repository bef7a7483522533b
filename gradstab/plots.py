"""Alias of :mod:`gradstab.diagnosis.plots`, where the plots moved: old imports keep working."""

import sys

from gradstab.diagnosis import plots as _target

sys.modules[__name__] = _target
