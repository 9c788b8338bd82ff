"""The ways backupfs can say no, one exception class each.

Every class is a Cinder ``BackupDriverException``, so Cinder's backup manager
keeps the text as the backup's ``fail_reason``. The text names what failed and
why, with backupfs' own reason where it gave one (a failed backup's record);
``errno`` keeps the errno backupfs answered (None when no call failed), and
``backup_id`` the backupfs id of a backup that was started and then failed.
"""

from cinder import exception
from cinder.i18n import _


class BackupfsError(exception.BackupDriverException):
    """Base class: backupfs, or the way it is set up, refused an operation."""

    message = _("backupfs: %(reason)s")

    def __init__(self, reason, errno=None, backup_id=None):
        self.errno = errno
        self.backup_id = backup_id
        super().__init__(reason=reason)


class NotMounted(BackupfsError):
    """``backupfs_mountpoint`` is not a live backupfs mount."""


class TargetNotFound(BackupfsError):
    """No target of that name (``backupfs_target``, or a container)."""


class InvalidContainer(BackupfsError):
    """A backup's container (its target) breaks backupfs' name rule."""


class InvalidBackupfsId(BackupfsError):
    """A backupfs id (service_metadata, an import's) is not a backup id."""


class RequestRefused(BackupfsError):
    """backupfs found the request malformed (EINVAL)."""


class VolumeNotServed(BackupfsError):
    """No backend of backupfs holds the volume (ENOENT)."""


class VolumeBusy(BackupfsError):
    """The volume has a backup running (on any node) or is being restored
    (EBUSY)."""


class TargetFull(BackupfsError):
    """The target has less free space than the volume's data (ENOSPC)."""


class BackupFailed(BackupfsError):
    """backupfs accepted the backup, then it failed; its record says why."""


class NotSupported(BackupfsError):
    """Cinder asked for something backupfs cannot do (a snapshot's backup)."""


class BackupUnavailable(BackupfsError):
    """The backup has no available image on the target (gone or failed)."""


class DamagedBackup(BackupfsError):
    """Reading the image failed its checksums (EIO): the data is damaged."""


class BackupInUse(BackupfsError):
    """backupfs refused to delete the backup (still being made, or the parent
    of an incremental backup in progress on any node)."""


class MetadataNotStored(BackupfsError):
    """Cinder's backup metadata could not be kept with the backup."""
