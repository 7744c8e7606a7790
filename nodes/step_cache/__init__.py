"""The Speculative Cache node: forecast, then verify (node.py; the run: glue.py)."""
