"""What can be built: blocks, the model builder (YOLOv5's and YOLOv7's YAML dialects), and the search space.

Pure: takes and returns objects; no file writes, devices or environment side effects.
"""
