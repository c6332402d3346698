"""A small synthetic object-detection data set (TFRecords, label map, pipeline.config) for demos and
tests. ``generate.py`` imports tensorflow, so run it in a worker process:

    python -m oddaemon.workers generate-demo --out DIR [--model effdet_d0|ssd_mobilenet_tiny]
"""
