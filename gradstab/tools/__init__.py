"""gradstab's command-line tools: ``python -m gradstab bench | demo | report``.

The library (everything outside this subpackage) never imports from here; the tools import
the library like any user would. :mod:`gradstab.tools.cli` holds the command table, each
command its own module or subpackage (``add_arguments(parser)`` and ``run(args, argv)``), and
:mod:`gradstab.tools.results` what every benchmark run reports besides its timings.
"""
