"""The pure core: job specs and their validation, states, the scheduler (state + event + now ->
state + actions), evaluation bookkeeping, failure classification, views, path layout.

No I/O beyond reading a named file; imports only oddaemon.formats.
"""
