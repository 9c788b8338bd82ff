"""Three cinder-backup hosts, each with its own backupfs, on one target.

Cinder's API sends each backup request to any backup service that is up, so
a backup made on one host is restored and deleted on others. Here three
``BackupManager`` instances with their own ``host`` are those services; each
has its own backupfs daemon and mount (nodes a, b and c), and the three
daemons serve target ``t`` in one pool directory and the volumes of one
volume pool, as backup hosts on shared storage do.

A cinder-backup service is a process with its own cinder.conf; the three
managers here share one process and one CONF, so a host's options
(``backupfs_mountpoint``) are set around each of its calls. The manager makes
its driver at the start of each operation, and the driver reads its
mountpoint then: a call keeps its host's mount even while another host's call
runs.
"""

import contextlib
import os
import threading
import time

from oslo_config import cfg
from oslo_service import loopingcall
from oslo_utils import importutils

from cinder import exception as cinder_exception
from cinder import objects
from cinder.objects import fields

from backupfs_cinder import exception
from tests import base
from tests import test_manager
from tests.base import GiB
from tests.base import MiB

CONF = cfg.CONF


class Host:
    """One cinder-backup service: a BackupManager named ``name`` whose
    driver uses the mount of backupfs node ``node``.
    """

    def __init__(self, name, node):
        self.name = name
        self.node = node
        self.manager = importutils.import_object(CONF.backup_manager,
                                                 host=name)

    @contextlib.contextmanager
    def configured(self):
        """This host's cinder.conf, while it works."""
        before = CONF.backupfs_mountpoint
        CONF.set_override('backupfs_mountpoint', self.node.mountpoint)
        try:
            yield
        finally:
            CONF.set_override('backupfs_mountpoint', before)

    def run(self, operation, *args):
        """The manager's ``operation``, as this host's service runs it."""
        with self.configured():
            return getattr(self.manager, operation)(*args)


def listed(node, backupfs_id):
    """Whether the node's mount lists the backup's image."""
    return ('%s.img' % backupfs_id
            in os.listdir(os.path.join(node.mountpoint, 'backups', 't')))


class ThreeHostsTest(test_manager.ManagerTestCase):

    def setUp(self):
        super().setUp()
        # Node c can hold a backup just before it becomes available (the
        # daemon's test hook) until the release file exists; it exists
        # unless a test takes it away.
        self.release = os.path.join(self.sandbox.dir, 'release')
        self.release_held()
        self.addCleanup(self.release_held)
        node_b = self.sandbox.node('b', self.target_pool, self.node.pool)
        node_c = self.sandbox.node(
            'c', self.target_pool, self.node.pool,
            env={'BACKUPFS_TEST_PAUSE': 'finishing',
                 'BACKUPFS_TEST_RELEASE': self.release})
        node_b.start()
        node_c.start()
        self.nodes = [self.node, node_b, node_c]
        self.hosts = [Host('backup-%d' % number, node)
                      for number, node in enumerate(self.nodes, 1)]
        for host in self.hosts:
            # Each service checks its own mount before it takes any work.
            self.assertRaises(loopingcall.LoopingCallDone, host.run,
                              '_setup_backup_driver', self.ctxt)
            self.assertTrue(host.manager.is_working())

    def release_held(self):
        open(self.release, 'w').close()

    def backing_up(self, volume, host, **kwargs):
        """A backup of the volume as the API hands it to ``host``, started
        there (create_backup); the copy is continue_backup's.
        """
        volume.status = 'backing-up'
        volume.previous_status = 'available'
        volume.save()
        backup = self.create_backup(volume, host=host.name, **kwargs)
        host.run('create_backup', self.ctxt, backup)
        return backup

    def back_up(self, volume, host, **kwargs):
        backup = self.backing_up(volume, host, **kwargs)
        host.run('continue_backup', self.ctxt, backup,
                 self._backup_device(volume))
        return objects.Backup.get_by_id(self.ctxt, backup.id)

    def restore_on(self, host, backup):
        """A new volume restored from the backup by ``host``."""
        new = self.create_volume(status='restoring-backup',
                                 display_name='restore_backup_%s' % backup.id)
        with open(self.node.volume_path(new.id), 'wb') as f:
            f.truncate(GiB)  # what the volume driver made
        backup.status = fields.BackupStatus.RESTORING
        backup.save()
        host.run('restore_backup', self.ctxt, backup, new.id, True)
        return objects.Volume.get_by_id(self.ctxt, new.id)

    def delete_on(self, host, backup):
        backup.status = fields.BackupStatus.DELETING
        backup.save()
        host.run('delete_backup', self.ctxt, backup)

    def assertGoneEverywhere(self, backupfs_id):
        # A deletion is gone from every node within 5 s (docs/operating.md); a node's
        # kernel may keep the names it listed for up to a second.
        deadline = time.monotonic() + 5
        for node in self.nodes:
            image = os.path.join(node.mountpoint, 'backups', 't',
                                 '%s.img' % backupfs_id)
            while ((os.path.exists(image) or listed(node, backupfs_id))
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            self.assertFalse(os.path.exists(image), node.name)
            self.assertFalse(listed(node, backupfs_id), node.name)
            self.assertIsNone(self.backupfs_record(backupfs_id, node),
                              node.name)
        self.assertEqual([], [name for name in os.listdir(self.target_pool)
                              if backupfs_id in name])

    def test_a_backup_made_on_one_host_is_restored_and_deleted_on_others(self):
        host_1, host_2, host_3 = self.hosts
        pieces = base.random_pieces(*base.SPARSE)
        volume = self.create_volume(pieces, metadata={'tier': 'gold'})
        full = self.back_up(volume, host_1)
        self.assertEqual(fields.BackupStatus.AVAILABLE, full.status)
        full_id = full.service_metadata
        self.assertEqual('a', self.record(full)['node'])
        # Listed on every node as soon as it is available.
        for node in self.nodes:
            self.assertTrue(listed(node, full_id), node.name)

        # Restored on host 2, through node b.
        restored = self.restore_on(host_2, full)
        self.assertEqual('available', restored.status)
        self.assertEqual('gold', restored.metadata['tier'])
        self.assertContent(self.node.volume_path(restored.id), pieces)

        # An incremental on host 3 builds on host 1's backup.
        changed = base.random_pieces((500 * MiB + 4321, 2 * MiB))
        base.write_pieces(self.node.volume_path(volume.id), changed)
        pieces.update(changed)
        incremental = self.back_up(volume, host_3, parent_id=full.id)
        self.assertEqual(fields.BackupStatus.AVAILABLE, incremental.status)
        record = self.record(incremental, self.nodes[0])
        self.assertEqual('c', record['node'])
        self.assertEqual(full_id, record['parent_id'])
        # It stored what changed, sharing the rest with its parent.
        self.assertLess(record['stored_bytes'], 4 * MiB)
        self.assertEqual(1, objects.Backup.get_by_id(
            self.ctxt, full.id).num_dependent_backups)
        # Restored whole on host 1.
        restored = self.restore_on(host_1, incremental)
        self.assertContent(self.node.volume_path(restored.id), pieces)

        # Deleted in Cinder's order (the incremental first), each on a host
        # that did not make it; gone from every node's mount.
        incremental_id = incremental.service_metadata
        self.delete_on(host_1, incremental)
        self.assertGoneEverywhere(incremental_id)
        full = objects.Backup.get_by_id(self.ctxt, full.id)
        self.delete_on(host_2, full)
        for backup in (incremental, full):
            self.assertRaises(cinder_exception.BackupNotFound,
                              objects.Backup.get_by_id, self.ctxt, backup.id)
        self.assertGoneEverywhere(full_id)

    def wait_for_job(self, node, volume, state, thread):
        """Waits until the node lists a job of the volume in ``state``."""
        jobs = os.path.join(node.mountpoint, 'backups', 't', 'jobs')
        deadline = time.monotonic() + 60
        while True:
            with open(jobs) as f:
                if any(line.split()[1:3] == [volume.id, state]
                       for line in f):
                    return
            self.assertTrue(thread.is_alive(), 'the backup ended early')
            self.assertLess(time.monotonic(), deadline,
                            'no job of %s in %s on node %s:\n%s'
                            % (volume.id, state, node.name, node.log()))
            time.sleep(0.05)

    def test_one_volume_backed_up_on_two_hosts_at_once_is_busy_on_one(self):
        host_1, host_2, host_3 = self.hosts
        node_b, node_c = self.nodes[1:]
        pieces = base.random_pieces(*base.SPARSE)
        volume = self.create_volume(pieces)
        full = self.back_up(volume, host_1)

        # Host 3 starts an incremental backup; node c holds it before the
        # end.
        changed = base.random_pieces((GiB - 8 * MiB, MiB))
        base.write_pieces(self.node.volume_path(volume.id), changed)
        pieces.update(changed)
        os.unlink(self.release)
        held = self.backing_up(volume, host_3, parent_id=full.id)
        failures = []

        def continue_held():
            try:
                host_3.run('continue_backup', self.ctxt, held,
                           self._backup_device(volume))
            except Exception as e:
                failures.append(e)
        thread = threading.Thread(target=continue_held)
        thread.start()
        self.addCleanup(thread.join, 60)
        self.addCleanup(self.release_held)  # first, if the test fails
        self.wait_for_job(node_c, volume, 'finishing', thread)

        # Meanwhile host 2 is asked for a backup of the same volume: busy.
        second = self.backing_up(volume, host_2)
        e = self.assertRaises(exception.VolumeBusy, host_2.run,
                              'continue_backup', self.ctxt, second,
                              self._backup_device(volume))
        second = objects.Backup.get_by_id(self.ctxt, second.id)
        self.assertEqual(fields.BackupStatus.ERROR, second.status)
        self.assertEqual(str(e), second.fail_reason)
        self.assertIn('volume %s is busy' % volume.id, second.fail_reason)
        self.assertIn('volume %s is being backed up by node c'
                      % volume.id, second.fail_reason)
        self.assertIsNone(second.service_metadata)

        # Nor is the parent of the held backup deleted, on any host.
        full = objects.Backup.get_by_id(self.ctxt, full.id)
        self.assertRaises(exception.BackupInUse, self.delete_on, host_2, full)
        full = objects.Backup.get_by_id(self.ctxt, full.id)
        self.assertEqual(fields.BackupStatus.ERROR, full.status)
        self.assertIn('an incremental backup in progress', full.fail_reason)
        for node in self.nodes:
            self.assertEqual('available',
                             self.record(full, node)['status'], node.name)

        # Released, host 3's backup ends well, on host 1's backup.
        self.release_held()
        thread.join(60)
        self.assertFalse(thread.is_alive())
        self.assertEqual([], failures)
        held = objects.Backup.get_by_id(self.ctxt, held.id)
        self.assertEqual(fields.BackupStatus.AVAILABLE, held.status)
        record = self.record(held, node_b)
        self.assertEqual('c', record['node'])
        self.assertEqual(full.service_metadata, record['parent_id'])
        self.assertEqual('available',
                         objects.Volume.get_by_id(self.ctxt,
                                                  volume.id).status)
        restored = self.restore_on(host_1, held)
        self.assertContent(self.node.volume_path(restored.id), pieces)
