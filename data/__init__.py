"""Data: loading edit records (data.records), a user's facts (data.facts), tokenising tuples
(data.collate), grouping edits (data.groups).

Nothing is imported here: main.py reads facts and records before torch is imported, so that a bad
input is refused in seconds, and data.collate and data.groups import torch.
"""
