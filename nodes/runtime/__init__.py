"""What every node feature of the pack shares (see feature.py)."""
