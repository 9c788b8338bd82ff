"""What every test of the driver starts from.

BackupfsTestCase is Cinder's own test base (in-memory database, config
fixtures) plus a sandbox where node ``a`` runs a real backupfs, with Cinder
configured to use it: ``backupfs_mountpoint`` is node a's mount and
``backupfs_target`` its target ``t``. Volumes are Cinder ``Volume`` rows
whose files lie in node a's volume pool, as a RemoteFS driver names them.
"""

import errno
import os

from cinder import context
from cinder import objects
from cinder.objects import fields
from cinder.tests.unit import fake_constants as fake
from cinder.tests.unit import test
from cinder.tests.unit import utils as test_utils

from backupfs_cinder import driver
from backupfs_cinder import mount
from tests import backupfs_node
from tests.backupfs_node import GiB
from tests.backupfs_node import MiB


def random_pieces(*spans):
    """{offset: random bytes} for (offset, length) spans."""
    return {offset: os.urandom(length) for offset, length in spans}


# Where a test volume of 1 GiB holds data: unaligned, and at both ends.
SPARSE = ((0, 3 * MiB), (300 * MiB + 12345, MiB + 7), (GiB - 2 * MiB, 2 * MiB))


def write_pieces(path, pieces, size=None):
    """Writes ``pieces`` into the file, first made ``size`` if given."""
    with open(path, 'r+b' if os.path.exists(path) else 'w+b') as f:
        if size is not None:
            f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)


def content_mismatch(path, pieces, size):
    """None if the file has ``size`` bytes that read as ``pieces`` over
    zeros; otherwise where it differs. Reads only its data, not its holes.
    """
    if os.path.getsize(path) != size:
        return 'size %d, not %d' % (os.path.getsize(path), size)
    with open(path, 'rb') as f:
        fd = f.fileno()
        for offset, data in pieces.items():
            if os.pread(fd, len(data), offset) != data:
                return 'the data at %d differs' % offset
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for chunk in range(start, end, 4 * MiB):
                got = os.pread(fd, min(4 * MiB, end - chunk), chunk)
                expected = bytearray(len(got))
                for at, data in pieces.items():
                    lo = max(at, chunk)
                    hi = min(at + len(data), chunk + len(got))
                    if lo < hi:
                        expected[lo - chunk:hi - chunk] = data[lo - at:hi - at]
                if got != expected:
                    return 'bytes %d..%d differ' % (chunk, chunk + len(got))
            offset = end
    return None


class BackupfsTestCase(test.TestCase):

    def setUp(self):
        super().setUp()
        self.ctxt = context.get_admin_context()
        self.sandbox = backupfs_node.Sandbox()
        self.addCleanup(self.sandbox.cleanup)
        # Volumes and backups on XFS, as incremental backups want (reflinks).
        storage = self.sandbox.xfs('storage', 4096)
        self.target_pool = os.path.join(storage, 'backups')
        os.mkdir(self.target_pool)
        self.node = self.sandbox.node('a', self.target_pool,
                                      os.path.join(storage, 'a-volumes'))
        self.node.start()
        self.use_node(self.node)

    def use_node(self, node):
        self.override_config('backupfs_mountpoint', node.mountpoint)
        self.override_config('backupfs_target', 't')
        self.driver = driver.BackupfsBackupDriver(self.ctxt)

    def create_volume(self, pieces=None, node=None, size_gb=1, **kwargs):
        """A Cinder volume whose file in the node's pool holds ``pieces``."""
        volume = test_utils.create_volume(self.ctxt, size=size_gb, **kwargs)
        if pieces is not None:
            write_pieces((node or self.node).volume_path(volume.id), pieces,
                         size_gb * GiB)
        return volume

    def create_backup(self, volume, **kwargs):
        """A Cinder backup of the volume, as the API records it (creating)."""
        values = {'user_id': fake.USER_ID,
                  'project_id': fake.PROJECT_ID,
                  'volume_id': volume.id,
                  'status': fields.BackupStatus.CREATING,
                  'display_name': 'test_backup',
                  'size': volume.size,
                  'host': 'testhost',
                  'metadata': {}}
        values.update(kwargs)
        backup = objects.Backup(self.ctxt, **values)
        backup.create()
        return backup

    def restore(self, backup, volume, volume_is_new, node=None):
        """Restores as Cinder's backup manager does: the volume's file
        (created by its volume driver) opened with 'wb'.
        """
        path = (node or self.node).volume_path(volume.id)
        if not os.path.exists(path):
            with open(path, 'wb') as f:
                f.truncate(volume.size * GiB)
        backup.status = fields.BackupStatus.RESTORING
        backup.save()
        with open(path, 'wb') as volume_file:
            self.driver.restore(backup, volume.id, volume_file, volume_is_new)
        return path

    def assertContent(self, path, pieces, size=GiB):
        mismatch = content_mismatch(path, pieces, size)
        self.assertIsNone(mismatch, '%s: %s' % (path, mismatch))

    def record(self, backup, node=None):
        """The backupfs record of a Cinder backup, read through the mount."""
        return self.backupfs_record(backup.service_metadata, node)

    def backupfs_record(self, backupfs_id, node=None):
        """A record of target t, or None if there is none."""
        return mount.Mount((node or self.node).mountpoint).record(
            't', backupfs_id)
