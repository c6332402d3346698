"""The daemon: wiring of loop events into the scheduler and the execution of its actions (commands,
intake, preflight, supervision through an executor, evaluation, warm evaluator, watchers, progress,
announcements, recovery, D-Bus service).

May import adapters, core and formats, never cli.
"""
