"""I/O adapters, each small and replaceable by a recording fake: the event loop, processes, files
(store, spool, logs, pins, book), inotify, sdnotify, the control socket, D-Bus connection, metrics
exposition, confinement.

May import core and formats, never service or cli.
"""
