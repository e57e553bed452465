"""Data: loading edit records, tokenising tuples, grouping edits."""
from data.collate import Collator
from data.groups import EditGroup, edit_groups, n_groups
from data.records import DataError, EditRecord, load_records

__all__ = ["Collator", "DataError", "EditGroup", "EditRecord", "edit_groups", "load_records", "n_groups"]
