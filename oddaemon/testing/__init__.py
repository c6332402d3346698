"""Test helpers that ship with the package (the stand-in worker)."""
