"""The Speculative Cache Token Pruning node (DaTo): node.py, and its run: pruning.py."""
