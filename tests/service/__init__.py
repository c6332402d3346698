"""In-process tests of the service layer: its classes on a fake loop and a manual clock (tests/support/fakes.py)."""
