"""What can be built: blocks, the YOLOv5-format model builder, and the search space.

Pure: takes and returns objects; no file writes, devices or environment side effects.
"""
