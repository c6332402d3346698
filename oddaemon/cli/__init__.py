"""The oddaemon command line: argparse, transports (control socket, D-Bus), rendering, submit receipts, the demo.

May import everything above workers.
"""
