"""The Speculative Cache Edit Region node (EEdit): node.py, and its run: region.py."""
