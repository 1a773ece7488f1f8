"""Backup and restore of a whole CA: keys, files and database in one encrypted archive."""

from ._archive import FORMAT_VERSION, ArchiveReader, ArchiveWriter
from ._backup import BackupSummary, create_backup, restore_backup, verify_backup

__all__ = [
    "FORMAT_VERSION",
    "ArchiveReader",
    "ArchiveWriter",
    "BackupSummary",
    "create_backup",
    "restore_backup",
    "verify_backup",
]
