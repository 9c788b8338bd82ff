"""The mounted backupfs tree, used as backupfs' docs/operating.md describes it.

One method per question the Cinder driver asks backupfs: is it mounted, which
targets and backends it serves, make a backup and wait for it, read a record,
open an image, keep or read metadata on an image, delete a backup. Each
refusal becomes a specific exception from backupfs_cinder.exception. Calls
block (a backup request waits for the whole copy): under eventlet, callers run
them in native threads. Nothing here knows Cinder's objects or database.
"""

import errno
import json
import os
import re

from backupfs_cinder import exception

_BACKUP_ID = re.compile(
    r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z')
# backupfs' rule for target names (docs/operating.md, "names"): they become one path
# component, so no '/', no '..', no leading dot, no NUL.
_TARGET_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z')


def check_target_name(target):
    """Raises InvalidContainer unless ``target`` can be a backupfs target.

    A backup's container comes from whoever created (or imported) the backup
    and is joined to paths the root daemon's mount answers: it must never
    leave ``<mountpoint>/backups/``.
    """
    if not isinstance(target, str) or not _TARGET_NAME.match(target):
        raise exception.InvalidContainer(
            'container %r is not a backupfs target name (1 to 128 of '
            'A-Z a-z 0-9 . _ -, starting with a letter or digit)' % (target,))


def check_backup_id(backup_id):
    """Raises InvalidBackupfsId unless ``backup_id`` is a backupfs id."""
    if not isinstance(backup_id, str) or not _BACKUP_ID.match(backup_id):
        raise exception.InvalidBackupfsId(
            '%r is not a backupfs backup id (a lowercase UUID)'
            % (backup_id,))
_MOUNTINFO_ESCAPE = re.compile(r'\\([0-7]{3})')


def _unescape(field):
    """A path from /proc/self/mountinfo, whose spaces read as \\040."""
    return _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


class Mount:
    """The backupfs mount at ``mountpoint``."""

    def __init__(self, mountpoint):
        self.mountpoint = os.path.realpath(mountpoint)

    def _path(self, *parts):
        return os.path.join(self.mountpoint, *parts)

    def image_path(self, target, backup_id):
        return self._path('backups', target, '%s.img' % backup_id)

    def record_path(self, target, backup_id):
        return self._path('backups', target, '%s.json' % backup_id)

    # -- set-up ------------------------------------------------------------

    def _is_backupfs_mount(self):
        """True if the newest mount at the mountpoint is backupfs' FUSE one."""
        found = False
        with open('/proc/self/mountinfo') as mountinfo:
            for line in mountinfo:
                fields = line.split()
                after = fields.index('-')
                if _unescape(fields[4]) != self.mountpoint:
                    continue
                fstype, source = fields[after + 1], fields[after + 2]
                found = fstype.startswith('fuse') and source == 'backupfs'
        return found

    def check_mounted(self):
        """Raises NotMounted unless a live backupfs serves the mountpoint."""
        if not self._is_backupfs_mount():
            raise exception.NotMounted(
                '%s is not a backupfs mount: start backupfs there '
                '(systemctl start backupfs, or mount it from fstab)'
                % self.mountpoint)
        try:
            os.listdir(self._path('backups'))
        except OSError as e:
            raise exception.NotMounted(
                'the backupfs mount at %s does not answer (%s): its daemon '
                'has died; restart backupfs' % (self.mountpoint, e.strerror),
                e.errno) from None

    def targets(self):
        return sorted(os.listdir(self._path('backups')))

    def backends(self):
        return sorted(os.listdir(self._path('volumes')))

    def check_target(self, target):
        """Raises unless the mount is live and serves ``target``."""
        self.check_mounted()
        if not target:
            raise exception.TargetNotFound(
                'no backupfs target is configured: set backupfs_target in '
                'cinder.conf to one of the targets of %s: %s'
                % (self.mountpoint, ', '.join(self.targets()) or 'none'))
        check_target_name(target)
        if (target not in self.targets()
                or not os.path.isfile(self._path('backups', target,
                                                 'request'))):
            raise exception.TargetNotFound(
                'backupfs at %s has no target %r (its targets: %s)'
                % (self.mountpoint, target,
                   ', '.join(self.targets()) or 'none'))

    # -- backups -----------------------------------------------------------

    def serves(self, volume_id):
        """Whether a backend of the mount has the volume."""
        return any(os.path.exists(self._path('volumes', backend, volume_id))
                   for backend in self.backends())

    def backup(self, target, volume_id, name, incremental=False, device=None):
        """Backs up the volume and waits for the end; the new backup's id.

        With ``device`` (an absolute path), backupfs reads the block device
        there as the volume instead of looking for it in its backends.
        """
        words = [volume_id, 'wait', 'name=%s' % name]
        if incremental:
            words.append('incremental')
        if device is not None:
            # Quoted, as the request's grammar wants a word with spaces.
            words.append('device="%s"' % device.replace('\\', '\\\\')
                         .replace('"', '\\"'))
        line = ' '.join(words)
        try:
            fd = os.open(self._path('backups', target, 'request'), os.O_RDWR)
        except OSError as e:
            hint = ''
            if e.errno in (errno.EACCES, errno.EPERM):
                hint = ': request is root\'s only, run cinder-backup as root'
            raise exception.BackupfsError(
                'opening the request of target %s failed (%s)%s'
                % (target, e.strerror, hint), e.errno) from None
        try:
            try:
                written = os.write(fd, (line + '\n').encode())
            except OSError as e:
                raise self._backup_error(target, volume_id, line,
                                         self._read_answer(fd),
                                         e.errno) from None
            backup_id, _ = self._read_answer(fd)
        finally:
            os.close(fd)
        if written != len(line) + 1 or backup_id is None:
            raise exception.BackupfsError(
                'backupfs accepted the backup of volume %s on target %s but '
                'did not answer with its id' % (volume_id, target))
        return backup_id

    @staticmethod
    def _read_answer(fd):
        """(backup id, None) after a request that made a job, else (None,
        backupfs' reason for refusing it, if it gave one).
        """
        answer = os.read(fd, 4096).decode('utf-8', 'replace').strip()
        if _BACKUP_ID.match(answer):
            return answer, None
        if answer.startswith('error: '):
            return None, answer[len('error: '):]
        return None, None

    def _backup_error(self, target, volume_id, line, answer, code):
        """The exception for a request that failed with ``code``."""
        backup_id, reason = answer
        if backup_id is not None:
            # Accepted, then failed: the record has the daemon's reason.
            record = self.record(target, backup_id) or {}
            reason = record.get('error') or os.strerror(code)
            cls = {errno.ENOSPC: exception.TargetFull,
                   errno.EBUSY: exception.VolumeBusy}.get(
                       code, exception.BackupFailed)
            return cls('backup %s of volume %s on target %s failed: %s'
                       % (backup_id, volume_id, target, reason),
                       code, backup_id)
        said = ('backupfs says: %s' % reason if reason else
                'the backupfs log says why')
        if code == errno.ENOENT:
            return exception.VolumeNotServed(
                'volume %s is not on any backend that backupfs serves '
                '(backends: %s); backupfs sees a volume of a file or qcow2 '
                'backend as the file volume-%s in a pool directory of the '
                'backend, of a block backend as a device (or a link to one) '
                'of that name, and reads a volume on none of them only when '
                'Cinder attaches it as a block device'
                % (volume_id, ', '.join(self.backends()) or 'none',
                   volume_id), code)
        if code == errno.EBUSY:
            if not reason:
                said = ('a backup of it is queued or running, it is being '
                        'restored, or it is in use and its pool cannot make '
                        'snapshots; the backupfs log says which')
            return exception.VolumeBusy(
                'volume %s is busy; %s' % (volume_id, said), code)
        if code == errno.ENOSPC:
            return exception.TargetFull(
                'target %s has less free space than the data of volume %s; '
                '%s' % (target, volume_id, said), code)
        if code == errno.EINVAL:
            return exception.RequestRefused(
                'backupfs refused the request %r as invalid; %s'
                % (line, said), code)
        return exception.BackupfsError(
            'backupfs refused the backup of volume %s on target %s (%s); %s'
            % (volume_id, target, os.strerror(code), said), code)

    def record(self, target, backup_id):
        """The backup's record as a dict, or None if there is none."""
        try:
            with open(self.record_path(target, backup_id), 'rb') as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise exception.BackupfsError(
                'reading the record of backup %s on target %s failed: %s'
                % (backup_id, target, e.strerror), e.errno) from None
        try:
            return json.loads(text)
        except ValueError as e:
            raise exception.BackupfsError(
                'the record of backup %s on target %s is not JSON: %s'
                % (backup_id, target, e)) from None

    def unavailable(self, target, backup_id):
        """BackupUnavailable, saying why: gone, failed, or not finished."""
        record = self.record(target, backup_id)
        if record is None:
            why = 'is not on target %s (deleted?)' % target
        elif record.get('status') == 'error':
            why = ('on target %s failed (%s): it holds no data'
                   % (target, record.get('error')))
        else:
            why = ('on target %s is %s, not available'
                   % (target, record.get('status')))
        return exception.BackupUnavailable(
            'backup %s %s' % (backup_id, why), errno.ENOENT)

    def open_image(self, target, backup_id):
        """The backup's image, open for reading."""
        try:
            fd = os.open(self.image_path(target, backup_id), os.O_RDONLY)
        except FileNotFoundError:
            raise self.unavailable(target, backup_id) from None
        except OSError as e:
            raise exception.BackupfsError(
                'opening backup %s on target %s failed: %s'
                % (backup_id, target, e.strerror), e.errno) from None
        return Image(fd, target, backup_id)

    def get_xattr(self, target, backup_id, name):
        """The value of the image's extended attribute, or None if unset."""
        try:
            return os.getxattr(self.image_path(target, backup_id), name)
        except FileNotFoundError:
            raise self.unavailable(target, backup_id) from None
        except OSError as e:
            if e.errno == errno.ENODATA:
                return None
            raise exception.BackupfsError(
                'reading %s of backup %s on target %s failed: %s'
                % (name, backup_id, target, e.strerror), e.errno) from None

    def set_xattr(self, target, backup_id, name, value):
        """Keeps ``value`` (bytes) with the backup, in its record."""
        try:
            os.setxattr(self.image_path(target, backup_id), name, value)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                why = ('this backupfs keeps no extended attributes on images '
                       '(EOPNOTSUPP); a backupfs that keeps user.* '
                       'attributes is needed')
            elif e.errno in (errno.E2BIG, errno.ERANGE, errno.ENOSPC):
                why = ('%d bytes are more than backupfs keeps (%s)'
                       % (len(value), e.strerror))
            else:
                why = e.strerror
            raise exception.MetadataNotStored(
                'keeping %s on backup %s on target %s failed: %s'
                % (name, backup_id, target, why), e.errno) from None

    def delete(self, target, backup_id):
        """Deletes the backup; a backup that is already gone is fine."""
        # A mount that is gone must not pass for a backup that is gone.
        self.check_target(target)
        try:
            os.unlink(self.image_path(target, backup_id))
            return
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno == errno.EBUSY:
                # Only a backup in progress holds its parent: finished
                # incrementals are whole images that need none.
                raise exception.BackupInUse(
                    'backup %s on target %s cannot be deleted now: an '
                    'incremental backup in progress builds on it, on this '
                    'node or another node serving the target (EBUSY); delete '
                    'it once that backup has ended' % (backup_id, target),
                    e.errno) from None
            raise exception.BackupfsError(
                'deleting backup %s on target %s failed: %s'
                % (backup_id, target, e.strerror), e.errno) from None
        # No image: a failed backup leaves its record only.
        try:
            os.unlink(self.record_path(target, backup_id))
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno == errno.EPERM:
                status = (self.record(target, backup_id) or {}).get('status')
                raise exception.BackupInUse(
                    'backup %s on target %s is %s: it can be deleted once it '
                    'has ended (EPERM)' % (backup_id, target, status),
                    e.errno) from None
            raise exception.BackupfsError(
                'deleting the record of backup %s on target %s failed: %s'
                % (backup_id, target, e.strerror), e.errno) from None


class Image:
    """An open backup image: its size, where its data lies, checked reads."""

    def __init__(self, fd, target, backup_id):
        self._fd = fd
        self.target = target
        self.backup_id = backup_id
        self.size = os.fstat(fd).st_size

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def next_data(self, offset):
        """(start, end) of the first data at or after ``offset``, or None."""
        if offset >= self.size:
            return None
        try:
            start = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return None
            raise self._read_error(e, offset) from None
        end = os.lseek(self._fd, start, os.SEEK_HOLE)
        return start, min(end, self.size)

    def read_into(self, view, offset):
        """Fills ``view`` from ``offset``; the count, short only at the end.

        backupfs checks every block against the backup's checksums on the
        way out; a damaged one fails with EIO, raised as DamagedBackup.
        """
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise self._read_error(e, offset + done) from None
            if n == 0:
                break
            done += n
        return done

    def send_into(self, out_fd, offset, length):
        """Copies ``length`` bytes at ``offset`` to the same offset of
        ``out_fd`` inside the kernel (sendfile); the count, short only at the
        end. A read that fails raises as in read_into; a failed write of
        ``out_fd`` raises its OSError.
        """
        os.lseek(out_fd, offset, os.SEEK_SET)
        done = 0
        while done < length:
            try:
                n = os.sendfile(out_fd, self._fd, offset + done, length - done)
            except OSError as e:
                # The errno does not say which side failed: reading again
                # does.
                self.read_into(memoryview(bytearray(length - done)),
                               offset + done)
                raise e
            if n == 0:
                break
            done += n
        return done

    def _read_error(self, error, offset):
        if error.errno == errno.EIO:
            return exception.DamagedBackup(
                'backup %s on target %s is damaged: reading byte %d failed '
                'with EIO (its data does not match the checksum taken when '
                'it was made, or the target\'s storage failed)'
                % (self.backup_id, self.target, offset), error.errno)
        return exception.BackupfsError(
            'reading backup %s on target %s at byte %d failed: %s'
            % (self.backup_id, self.target, offset, error.strerror),
            error.errno)
