"""oddaemon's tests (a package so that tests import their shared helpers as ``tests.support``)."""
