"""Test helpers that ship with the package: the stand-in worker, hostile inputs, a main-loop stall.

May import anything of oddaemon; only tests (and the daemon's tests' subprocesses) import them.
"""
