"""oddaemon: a systemd-managed daemon that runs TensorFlow 2 Object Detection API training jobs.

The daemon itself never imports tensorflow; only the worker package (``oddaemon.workers``) does.
"""

__version__ = "0.1.0"
