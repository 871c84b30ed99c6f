"""What a built model becomes: its deploy (fused) form, and channel-pruned versions of it.

Pure: takes and returns objects; no files, devices or environment side effects.
"""
