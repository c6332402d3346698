"""File formats read and written without TensorFlow: TFRecord framing, TF event protobufs, pipeline.config text.

Pure functions and readers over bytes; imports nothing else of oddaemon.
"""
