"""What a built model becomes: its deploy (fused) form, and channel-pruned versions of it.

    reparam.py    fuse_model: RepVGG -> one 3x3 conv, Conv+BN folded
    channel.py    prune_to_flops: torch-pruning to a deploy-FLOPs target
    finetune.py   BatchNorms in and out for fine-tuning
    portable.py   save_pruned / load_pruned (a pruned model without pickle)
    atomic.py     the project's one atomic file writer (nas.files re-exports it)

Pure: takes and returns objects; no devices or environment side effects, and no file writes but a pruned model's
folder (portable.py, through atomic.py).
"""
