"""A Cinder backup driver whose backups backupfs makes, keeps and reads back.

Enabled in cinder.conf with::

    backup_driver = backupfs_cinder.driver.BackupfsBackupDriver
    backupfs_mountpoint = /mnt/backupfs
    backupfs_target = <a target of that mount>

backupfs, a FUSE daemon on the backup node, copies a volume from its own pool
(skipping holes, checksumming, snapshotting a volume in use): ``backup()``
asks it through the mount and waits. ``restore()`` reads the image back into
the volume Cinder attached; ``delete_backup()`` removes it. A Cinder backup
keeps its backupfs id in ``service_metadata`` and its target in
``container``. Cinder's backup metadata (the volume's metadata, given back on
restore) is the extended attribute ``user.cinder.backup_metadata`` of the
image, which backupfs keeps in the backup's record on the target: it travels
with the target to any node that mounts it.
"""

import os
import stat

from eventlet import tpool
from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import excutils
from oslo_utils import units

from cinder.backup import driver
from cinder import exception as cinder_exception
from cinder.i18n import _
from cinder import interface
from cinder import objects
from cinder.objects import fields
from cinder import utils

from backupfs_cinder import exception
from backupfs_cinder import mount

LOG = logging.getLogger(__name__)

backupfs_opts = [
    cfg.StrOpt('backupfs_mountpoint',
               default='/mnt/backupfs',
               help='Where backupfs is mounted on the backup node.'),
    cfg.StrOpt('backupfs_target',
               help='The backupfs target (a directory under '
                    '<backupfs_mountpoint>/backups/) that keeps new backups. '
                    'A backup created with a container goes to the target '
                    'of that name instead.'),
]

CONF = cfg.CONF
CONF.register_opts(backupfs_opts)

METADATA_XATTR = 'user.cinder.backup_metadata'
# A restore moves this much per read and write, whatever the volume's size.
COPY_CHUNK = 4 * units.Mi
# It looks whether the restore was cancelled each time it has covered this.
CANCEL_CHECK_BYTES = 256 * units.Mi


def _native(func, *args):
    """Runs blocking file system work where it cannot stall eventlet."""
    if utils.concurrency_mode_threading():
        return func(*args)
    return tpool.execute(func, *args)


class _FileDescriptorVolume:
    """A volume attached as an OS file: the kernel copies into it."""

    def __init__(self, fd):
        self.fd = fd

    def copy(self, image, offset, length):
        return _native(image.send_into, self.fd, offset, length)

    def write(self, offset, data):
        _native(_pwrite_all, self.fd, data, offset)


class _FileObjectVolume:
    """A volume given as a file object without a descriptor (as RBD's)."""

    def __init__(self, volume_file):
        self.file = volume_file
        self.buffer = memoryview(bytearray(COPY_CHUNK))

    def copy(self, image, offset, length):
        got = _native(image.read_into, self.buffer[:length], offset)
        self.write(offset, self.buffer[:got])
        return got

    def write(self, offset, data):
        self.file.seek(offset)
        while data:
            data = data[self.file.write(data):]


def _attached_volume(volume_file):
    """The way to write into the volume Cinder attached."""
    try:
        fd = volume_file.fileno()
    except (OSError, AttributeError):
        return _FileObjectVolume(volume_file)
    # What the file object holds must land before the raw writes do.
    volume_file.flush()
    return _FileDescriptorVolume(fd)


def _attached_device(volume_file):
    """The path of the block device Cinder attached as ``volume_file``; None
    when it is no block device (or has no descriptor).

    The path is the descriptor's own (/proc/self/fd/N), checked to name the
    same device: backupfs opens the path, and must read what Cinder attached.
    """
    try:
        fd = volume_file.fileno()
    except (OSError, AttributeError, ValueError):
        return None
    attached = os.fstat(fd)
    if not stat.S_ISBLK(attached.st_mode):
        return None
    path = os.readlink('/proc/self/fd/%d' % fd)
    try:
        named = os.stat(path)
    except OSError:
        named = None
    if (named is None or not stat.S_ISBLK(named.st_mode)
            or named.st_rdev != attached.st_rdev):
        raise exception.NotSupported(
            'the block device Cinder attached (%s) is not found by its path '
            'any more: backupfs reads it by path' % path)
    return path


def _pwrite_all(fd, data, offset):
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


@interface.backupdriver
class BackupfsBackupDriver(driver.BackupDriver):
    """Backups made, read back and deleted by backupfs."""

    def __init__(self, context):
        super().__init__(context)
        self.mount = mount.Mount(CONF.backupfs_mountpoint)

    @staticmethod
    def get_driver_options():
        return backupfs_opts

    def check_for_setup_error(self):
        """Raises unless backupfs is mounted and serves the target."""
        _native(self.mount.check_target, CONF.backupfs_target)

    @staticmethod
    def _target(backup):
        return backup.container or CONF.backupfs_target

    def _location(self, backup):
        """(target, backupfs id) of a backup that backupfs made.

        Both become paths under the mount: an imported backup's container and
        service_metadata are whatever its record said, so both are checked.
        """
        if not backup.service_metadata:
            raise exception.BackupUnavailable(
                'backup %s has no backupfs id: backupfs never made it'
                % backup.id)
        target = self._target(backup)
        mount.check_target_name(target)
        mount.check_backup_id(backup.service_metadata)
        return target, backup.service_metadata

    def _check_made_for(self, backup, target, backupfs_id):
        """Raises unless the backupfs backup was made for this Cinder backup.

        An imported record can name any backupfs id: without this, it could
        restore (or delete) another Cinder backup's data.
        """
        record = _native(self.mount.record, target, backupfs_id)
        if record is not None and record.get('name') != backup.id:
            raise exception.BackupUnavailable(
                'backup %s on target %s was made for backup %s, not %s'
                % (backupfs_id, target, record.get('name'), backup.id))

    def backup(self, backup, volume_file, backup_metadata=True):
        """Has backupfs back up the backup's volume, and waits for the end.

        backupfs reads the volume from its own pool: ``volume_file``, the
        device Cinder attached, is not read. A volume on no backend backupfs
        serves (LVM, an array) handed over as a block device is read there
        instead (``device=<path>``: the device, or Cinder's temporary snapshot
        of an in-use volume, attached to this node). An in-use volume is copied from
        a snapshot backupfs makes itself; Cinder's temporary snapshot for the
        backup (an overlay file) leaves ``volume-<id>`` as it was when it was
        taken, which is what is copied. With ``backup.parent_id`` set
        (Cinder's incremental backup) backupfs is asked for an incremental
        one; every backupfs backup is still a whole image.
        """
        if backup.snapshot_id:
            raise exception.NotSupported(
                'backup %s is of snapshot %s: backupfs backs up volumes, not '
                'Cinder snapshots' % (backup.id, backup.snapshot_id))
        volume = objects.Volume.get_by_id(self.context, backup.volume_id)
        target = self._target(backup)
        _native(self.mount.check_target, target)
        device = None
        if not _native(self.mount.serves, volume.name_id):
            # On no backend backupfs serves (LVM, an array): the device
            # Cinder attached to this node is read, if it is a block device.
            device = _native(_attached_device, volume_file)
        if device is None:
            self._check_pool_volume(volume, backup)
        backup.container = target
        backup.save()
        try:
            backupfs_id = _native(self.mount.backup, target, volume.name_id,
                                  backup.id, bool(backup.parent_id), device)
        except exception.BackupfsError as e:
            if e.backup_id:
                # Its record stays, for the operator, until Cinder deletes
                # this backup.
                backup.service_metadata = e.backup_id
                backup.save()
            raise
        backup.service_metadata = backupfs_id
        backup.save()
        LOG.info('backupfs made backup %(backupfs_id)s of volume %(volume)s '
                 'on target %(target)s for backup %(backup)s.',
                 {'backupfs_id': backupfs_id, 'volume': volume.id,
                  'target': target, 'backup': backup.id})
        if backup_metadata:
            self._keep_metadata(backup, target, backupfs_id)

    def _check_pool_volume(self, volume, backup):
        """Raises unless backupfs can find the volume in a pool as it is:
        named volume-<id>, with no RemoteFS snapshot overlays beside it.
        """
        if volume.name != 'volume-%s' % volume.name_id:
            raise exception.NotSupported(
                'volume %s is named %s: backupfs finds a volume only as '
                'volume-<id> (volume_name_template = volume-%%s)'
                % (volume.id, volume.name))
        snapshots = [snapshot.id for snapshot in
                     objects.SnapshotList.get_all_for_volume(self.context,
                                                             volume.id)
                     if snapshot.id != backup.temp_snapshot_id]
        if snapshots:
            # A RemoteFS snapshot is an overlay file: what was written since
            # is in volume-<id>.<snapshot-id>, and volume-<id> is stale.
            raise exception.NotSupported(
                'volume %s has Cinder snapshots (%s): its newer data is in '
                'their overlay files, which backupfs does not read; back it '
                'up once they are deleted' % (volume.id, ', '.join(snapshots)))

    def _keep_metadata(self, backup, target, backupfs_id):
        """Stores the volume's metadata with the backup (commit last)."""
        json_meta = self.get_metadata(backup.volume_id)
        if not json_meta:
            return
        try:
            _native(self.mount.set_xattr, target, backupfs_id,
                    METADATA_XATTR, json_meta.encode('utf-8'))
        except exception.BackupfsError:
            with excutils.save_and_reraise_exception():
                LOG.error('Backup %s has no metadata: deleting it.',
                          backup.id)
                self.delete_backup(backup)

    def restore(self, backup, volume_id, volume_file, volume_is_new):
        """Writes the backup's image into ``volume_file``.

        A new volume reads as zeros, so the image's holes are skipped, as
        Cinder's chunked drivers do; an existing volume gets zeros written
        there. Where the volume is an OS file (a file, a block device), the
        kernel copies the data (sendfile). Damaged data is never written: its
        read fails first (DamagedBackup) and the restore stops.
        """
        target, backupfs_id = self._location(backup)
        self._check_made_for(backup, target, backupfs_id)
        self._check_not_cancelled(backup, volume_id)
        with _native(self.mount.open_image, target, backupfs_id) as image:
            self._copy(image, backup, volume_id, volume_file, volume_is_new)
        volume = objects.Volume.get_by_id(self.context, volume_id)
        self._finish(volume_file, max(image.size, volume.size * units.Gi))
        LOG.info('Restored backupfs backup %(backupfs_id)s of target '
                 '%(target)s to volume %(volume)s.',
                 {'backupfs_id': backupfs_id, 'target': target,
                  'volume': volume_id})
        self._restore_metadata(target, backupfs_id, volume_id)

    @staticmethod
    def _pieces(image):
        """(offset, length, is_data) over the image, at most COPY_CHUNK."""
        offset = 0
        while offset < image.size:
            data_start, data_end = (_native(image.next_data, offset) or
                                    (image.size, image.size))
            for start, end, is_data in ((offset, data_start, False),
                                        (data_start, data_end, True)):
                for piece in range(start, end, COPY_CHUNK):
                    yield piece, min(COPY_CHUNK, end - piece), is_data
            offset = data_end

    def _copy(self, image, backup, volume_id, volume_file, volume_is_new):
        volume = _attached_volume(volume_file)
        zeros = None if volume_is_new else memoryview(bytes(COPY_CHUNK))
        next_check = CANCEL_CHECK_BYTES
        for offset, length, is_data in self._pieces(image):
            if offset >= next_check:
                self._check_not_cancelled(backup, volume_id)
                next_check = offset + CANCEL_CHECK_BYTES
            if is_data:
                got = volume.copy(image, offset, length)
                if got < length:
                    raise exception.BackupfsError(
                        'backup %s on target %s ends at byte %d, before its '
                        'size %d' % (image.backup_id, image.target,
                                     offset + got, image.size))
            elif zeros is not None:
                volume.write(offset, zeros[:length])

    def _check_not_cancelled(self, backup, volume_id):
        """Raises BackupRestoreCancel once the backup leaves 'restoring'."""
        with backup.as_read_deleted():
            backup.refresh()
        if backup.status != fields.BackupStatus.RESTORING:
            raise cinder_exception.BackupRestoreCancel(back_id=backup.id,
                                                       vol_id=volume_id)

    @staticmethod
    def _finish(volume_file, size):
        """Flushes the volume; a file volume gets at least ``size`` bytes.

        Cinder opens an attached volume with 'wb', which empties a file: the
        holes skipped at its end must still be part of it.
        """
        volume_file.flush()
        try:
            fileno = volume_file.fileno()
        except (IOError, AttributeError):
            LOG.debug('The volume has no file descriptor: no fsync.')
            return
        info = os.fstat(fileno)
        if stat.S_ISREG(info.st_mode) and info.st_size < size:
            volume_file.truncate(size)
        _native(os.fsync, fileno)

    def _restore_metadata(self, target, backupfs_id, volume_id):
        json_meta = _native(self.mount.get_xattr, target, backupfs_id,
                            METADATA_XATTR)
        if json_meta is None:
            LOG.debug('Backup %s has no volume metadata.', backupfs_id)
            return
        try:
            self.put_metadata(volume_id, json_meta.decode('utf-8'))
        except cinder_exception.BackupMetadataUnsupportedVersion:
            msg = _('Metadata restore failed due to incompatible version.')
            LOG.error(msg)
            raise cinder_exception.BackupOperationError(msg)

    def delete_backup(self, backup):
        """Deletes the backup's image and record; already gone is fine."""
        if not backup.service_metadata:
            LOG.debug('Backup %s was never made by backupfs: nothing to '
                      'delete.', backup.id)
            return
        target, backupfs_id = self._location(backup)
        _native(self.mount.check_target, target)
        self._check_made_for(backup, target, backupfs_id)
        _native(self.mount.delete, target, backupfs_id)

    def export_record(self, backup):
        target, backupfs_id = self._location(backup)
        return {'backupfs_target': target, 'backupfs_id': backupfs_id}

    def import_record(self, backup, driver_info):
        """Checks that this node's backupfs has the exported backup.

        Another node that mounts the same target sees the same backups: the
        backup must be available there and made for this Cinder backup.
        """
        try:
            target = driver_info['backupfs_target']
            backupfs_id = driver_info['backupfs_id']
        except (KeyError, TypeError):
            raise exception.BackupfsError(
                'the record of backup %s was not exported by the backupfs '
                'driver: no backupfs_target and backupfs_id in %r'
                % (backup.id, driver_info)) from None
        # Both come from the exported record, which anyone could have written.
        mount.check_target_name(target)
        mount.check_backup_id(backupfs_id)
        _native(self.mount.check_target, target)
        record = _native(self.mount.record, target, backupfs_id)
        if record is None or record.get('status') != 'available':
            raise _native(self.mount.unavailable, target, backupfs_id)
        if record.get('name') != backup.id:
            raise exception.BackupUnavailable(
                'backup %s on target %s was made for backup %s, not %s'
                % (backupfs_id, target, record.get('name'), backup.id))
