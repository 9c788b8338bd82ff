"""The driver against a real backupfs mount, with Cinder's own objects.

Each test has its own sandbox and daemon (tests.base); Cinder's volumes and
backups are rows of Cinder's in-memory database, their data real files.
"""

import errno
import io
import json
import os
import uuid

from cinder import exception as cinder_exception
from cinder import objects
from cinder.objects import fields
from cinder.tests.unit import utils as test_utils

from backupfs_cinder import driver
from backupfs_cinder import exception
from tests import base
from tests.base import GiB
from tests.base import MiB


class SetupCheckTest(base.BackupfsTestCase):

    def test_a_live_mount_serving_the_target_passes(self):
        self.driver.check_for_setup_error()

    def test_a_missing_target_fails_naming_the_targets_there_are(self):
        self.override_config('backupfs_target', 'nope')
        e = self.assertRaises(exception.TargetNotFound,
                              self.driver.check_for_setup_error)
        self.assertIn("no target 'nope' (its targets: t)", str(e))

    def test_an_unset_target_fails_naming_the_targets_there_are(self):
        self.override_config('backupfs_target', None)
        e = self.assertRaises(exception.TargetNotFound,
                              self.driver.check_for_setup_error)
        self.assertIn('set backupfs_target', str(e))
        self.assertIn(': t', str(e))

    def test_a_stopped_backupfs_fails(self):
        self.node.stop()
        e = self.assertRaises(exception.NotMounted,
                              self.driver.check_for_setup_error)
        self.assertIn('%s is not a backupfs mount' % self.node.mountpoint,
                      str(e))


class BackupRestoreTest(base.BackupfsTestCase):

    def setUp(self):
        super().setUp()
        self.pieces = base.random_pieces(*base.SPARSE)
        self.volume = self.create_volume(self.pieces)
        self.backup = self.create_backup(self.volume)
        self.driver.backup(self.backup, None)

    def test_backup_keeps_the_backupfs_id_and_target_in_cinder(self):
        backup = objects.Backup.get_by_id(self.ctxt, self.backup.id)
        self.assertEqual('t', backup.container)
        record = self.record(backup)
        self.assertEqual(backup.service_metadata, record['id'])
        self.assertEqual('available', record['status'])
        self.assertEqual(self.volume.id, record['volume_id'])
        self.assertEqual(backup.id, record['name'])
        # backupfs copied the data only: the holes stayed holes.
        self.assertLess(record['stored_bytes'], 8 * MiB)

    def test_restore_to_a_new_volume_is_exact_and_keeps_holes(self):
        new = self.create_volume(display_name='restore_backup_%s' %
                                 self.backup.id, status='restoring-backup')
        path = self.restore(self.backup, new, volume_is_new=True)
        self.assertContent(path, self.pieces)
        self.assertLess(os.stat(path).st_blocks * 512, 16 * MiB)

    def test_restore_to_a_new_volume_ending_in_a_hole_keeps_its_size(self):
        pieces = base.random_pieces((5 * MiB, MiB))
        backup = self.create_backup(self.create_volume(pieces))
        self.driver.backup(backup, None)
        new = self.create_volume(status='restoring-backup')
        path = self.restore(backup, new, volume_is_new=True)
        self.assertContent(path, pieces)

    def test_restore_to_an_existing_volume_overwrites_all_of_it(self):
        # The volume holds other data, also where the backup has holes. It
        # is attached as a block device, which opening with 'wb' does not
        # empty.
        other = base.random_pieces((0, 4 * MiB), (500 * MiB, 8 * MiB),
                                   (GiB - MiB, MiB))
        existing = self.create_volume(other, status='restoring-backup')
        path = self.node.volume_path(existing.id)
        device = self.sandbox.loop(path)
        self.backup.status = fields.BackupStatus.RESTORING
        self.backup.save()
        with open(device, 'wb') as volume_file:
            self.driver.restore(self.backup, existing.id, volume_file, False)
        self.sandbox.unloop(device)
        self.assertContent(path, self.pieces)

    def test_restore_into_a_volume_object_without_a_descriptor(self):
        # As Cinder's RBD volume object: seek and write, no fileno().
        new = self.create_volume(status='restoring-backup')
        path = self.node.volume_path(new.id)
        self.backup.status = fields.BackupStatus.RESTORING
        self.backup.save()
        with open(path, 'wb') as real:
            real.truncate(GiB)
            self.driver.restore(self.backup, new.id, NoFileno(real), True)
        self.assertContent(path, self.pieces)

    def test_volume_metadata_is_kept_with_the_backup_and_given_back(self):
        volume = self.create_volume(self.pieces, display_name='db-disk',
                                    metadata={'purpose': 'database'})
        backup = self.create_backup(volume)
        self.driver.backup(backup, None)
        image = mount_image(self.node, backup)
        kept = json.loads(os.getxattr(image, driver.METADATA_XATTR))
        self.assertEqual({'purpose': 'database'}, kept['volume-metadata'])
        new = self.create_volume(display_name='restore_backup_%s' % backup.id,
                                 status='restoring-backup')
        self.restore(backup, new, volume_is_new=True)
        new = objects.Volume.get_by_id(self.ctxt, new.id)
        self.assertEqual('database', new.metadata['purpose'])
        self.assertEqual('db-disk', new.display_name)

    def test_a_restore_cancelled_in_cinder_stops_before_writing(self):
        new = self.create_volume(status='restoring-backup')
        path = self.node.volume_path(new.id)
        self.backup.status = fields.BackupStatus.AVAILABLE
        self.backup.save()
        with open(path, 'wb') as volume_file:
            self.assertRaises(cinder_exception.BackupRestoreCancel,
                              self.driver.restore, self.backup, new.id,
                              volume_file, True)
        self.assertEqual(0, os.path.getsize(path))

    def test_incremental_backup_is_asked_for_and_restores_whole(self):
        changed = base.random_pieces((100 * MiB, 2 * MiB))
        base.write_pieces(self.node.volume_path(self.volume.id), changed)
        incremental = self.create_backup(self.volume,
                                         parent_id=self.backup.id)
        self.driver.backup(incremental, None)
        parent = objects.Backup.get_by_id(self.ctxt, self.backup.id)
        record = self.record(incremental)
        self.assertEqual(parent.service_metadata, record['parent_id'])
        # Only what changed was copied (2 MiB written at 100 MiB).
        self.assertLessEqual(record['changed_bytes'], 4 * MiB)
        new = self.create_volume(status='restoring-backup')
        path = self.restore(incremental, new, volume_is_new=True)
        self.assertContent(path, {**self.pieces, **changed})

    def test_delete_removes_the_backup_and_again_is_fine(self):
        backupfs_id = self.backup.service_metadata
        self.driver.delete_backup(self.backup)
        target = os.path.join(self.node.mountpoint, 'backups', 't')
        self.assertNotIn(backupfs_id + '.img', os.listdir(target))
        self.assertNotIn(backupfs_id + '.json', os.listdir(target))
        self.driver.delete_backup(self.backup)
        never_made = self.create_backup(self.volume)
        self.driver.delete_backup(never_made)

    def test_delete_without_backupfs_fails_rather_than_pass_for_done(self):
        self.node.stop()
        self.assertRaises(exception.NotMounted,
                          self.driver.delete_backup, self.backup)

    def test_restore_of_a_deleted_backup_says_it_is_gone(self):
        self.driver.delete_backup(self.backup)
        new = self.create_volume(status='restoring-backup')
        e = self.assertRaises(exception.BackupUnavailable, self.restore,
                              self.backup, new, True)
        self.assertIn('is not on target t', str(e))

    def test_export_then_import_on_a_second_node_restores_there(self):
        url = self.backup.encode_record(
            driver_info=self.driver.export_record(self.backup))
        # Node a stops; node b mounts the same target with pools of its own.
        self.node.stop()
        node_b = self.sandbox.node('b', self.target_pool)
        node_b.start()
        self.use_node(node_b)
        options = objects.Backup.decode_record(url)
        self.driver.import_record(self.backup, options['driver_info'])
        new = self.create_volume(status='restoring-backup')
        path = self.restore(self.backup, new, True, node=node_b)
        self.assertContent(path, self.pieces)
        self.assertTrue(path.startswith(node_b.pool))
        # Cinder's backup metadata came along with the target.
        kept = json.loads(os.getxattr(mount_image(node_b, self.backup),
                                      driver.METADATA_XATTR))
        self.assertEqual(self.volume.id, kept['volume-base-metadata']['id'])

    def test_import_of_a_backup_this_node_lacks_fails(self):
        info = {'backupfs_target': 't', 'backupfs_id': str(uuid.uuid4())}
        e = self.assertRaises(exception.BackupUnavailable,
                              self.driver.import_record, self.backup, info)
        self.assertIn('is not on target t', str(e))
        other = self.create_backup(self.volume)
        e = self.assertRaises(exception.BackupUnavailable,
                              self.driver.import_record, other,
                              self.driver.export_record(self.backup))
        self.assertIn('was made for backup %s, not %s'
                      % (self.backup.id, other.id), str(e))

    def test_restore_and_delete_refuse_a_container_or_id_off_the_name_rule(self):
        image = mount_image(self.node, self.backup)
        backupfs_id = self.backup.service_metadata
        new = self.create_volume(status='restoring-backup')
        for container, service_metadata, error in (
                ('../t', backupfs_id, exception.InvalidContainer),
                ('t/../t', backupfs_id, exception.InvalidContainer),
                ('t', '../t/' + backupfs_id, exception.InvalidBackupfsId),
                ('t', backupfs_id.upper(), exception.InvalidBackupfsId)):
            self.backup.container = container
            self.backup.service_metadata = service_metadata
            self.backup.save()
            self.assertRaises(error, self.restore, self.backup, new, True)
            self.assertRaises(error, self.driver.delete_backup, self.backup)
            self.assertRaises(error, self.driver.export_record, self.backup)
        self.assertTrue(os.path.exists(image))

    def test_import_refuses_a_target_or_id_off_the_name_rule(self):
        backupfs_id = self.backup.service_metadata
        for info, error in (
                ({'backupfs_target': '../backups/t', 'backupfs_id':
                  backupfs_id}, exception.InvalidContainer),
                ({'backupfs_target': '.t', 'backupfs_id': backupfs_id},
                 exception.InvalidContainer),
                ({'backupfs_target': 't', 'backupfs_id': '../t/' +
                  backupfs_id}, exception.InvalidBackupfsId),
                ({'backupfs_target': 't', 'backupfs_id': 1},
                 exception.InvalidBackupfsId)):
            self.assertRaises(error, self.driver.import_record, self.backup,
                              info)

    def test_another_cinder_backups_data_is_neither_restored_nor_deleted(self):
        # An imported record may name any backupfs id: here this backup's.
        other = self.create_backup(self.volume)
        other.container = 't'
        other.service_metadata = self.backup.service_metadata
        other.save()
        new = self.create_volume(status='restoring-backup')
        e = self.assertRaises(exception.BackupUnavailable, self.restore,
                              other, new, True)
        self.assertIn('was made for backup %s, not %s'
                      % (self.backup.id, other.id), str(e))
        self.assertRaises(exception.BackupUnavailable,
                          self.driver.delete_backup, other)
        self.assertTrue(os.path.exists(mount_image(self.node, self.backup)))
        # Cinder opened it with 'wb': nothing was written into it since.
        self.assertEqual(0, os.path.getsize(self.node.volume_path(new.id)))


class FailureTest(base.BackupfsTestCase):

    def test_a_container_off_the_name_rule_is_refused_before_any_request(self):
        # A directory outside the mount with a file named like a request:
        # the driver must never write there as root.
        outside = self.sandbox.mkdir('outside')
        planted = os.path.join(outside, 'request')
        with open(planted, 'w') as f:
            f.write('keep\n')
        escape = os.path.relpath(outside, os.path.join(self.node.mountpoint,
                                                       'backups'))
        volume = self.create_volume(base.random_pieces((0, MiB)))
        for container in (escape, '..', '.', '.hidden', 'a/b', 't\x00',
                          '-t', 'x' * 129):
            backup = self.create_backup(volume, container=container)
            self.assertRaises(exception.InvalidContainer, self.driver.backup,
                              backup, None)
        with open(planted) as f:
            self.assertEqual('keep\n', f.read())
        target = os.path.join(self.node.mountpoint, 'backups', 't')
        self.assertEqual([], [n for n in os.listdir(target)
                              if n.endswith('.json')])
        backup = self.create_backup(volume, container='nope')
        self.assertRaises(exception.TargetNotFound, self.driver.backup,
                          backup, None)

    def test_a_volume_backupfs_does_not_serve_fails_naming_the_backends(self):
        volume = self.create_volume()  # in Cinder's database only
        backup = self.create_backup(volume)
        e = self.assertRaises(exception.VolumeNotServed,
                              self.driver.backup, backup, None)
        self.assertEqual(errno.ENOENT, e.errno)
        self.assertIn('volume %s is not on any backend that backupfs serves '
                      '(backends: cinder, store)' % volume.id, str(e))
        self.assertIsNone(
            objects.Backup.get_by_id(self.ctxt, backup.id).service_metadata)

    def test_a_volume_on_no_backend_is_read_from_the_block_device_attached(
            self):
        # An LVM or array volume: in no pool of backupfs, attached by Cinder
        # to this node as a block device (a loop device stands for the LUN).
        pieces = base.random_pieces((2 * MiB, 3 * MiB), (700 * MiB, MiB))
        lun = os.path.join(self.sandbox.mkdir('luns'), 'lun')
        base.write_pieces(lun, pieces, GiB)
        device = self.sandbox.loop(lun)
        volume = self.create_volume()  # in Cinder's database only
        backup = self.create_backup(volume)
        with open(device, 'rb') as volume_file:
            self.driver.backup(backup, volume_file)
        self.sandbox.unloop(device)
        backup = objects.Backup.get_by_id(self.ctxt, backup.id)
        record = self.record(backup)
        self.assertEqual('available', record['status'])
        self.assertEqual(volume.id, record['volume_id'])
        self.assertEqual(device, record['device'])
        self.assertLess(record['stored_bytes'], 8 * MiB)
        new = self.create_volume(status='restoring-backup')
        path = self.restore(backup, new, volume_is_new=True)
        self.assertContent(path, pieces)

    def test_a_full_target_fails_with_target_full(self):
        small = self.sandbox.small_fs('small', 16)
        node = self.sandbox.node('f', os.path.join(small, 'backups'))
        os.mkdir(os.path.join(small, 'backups'))
        node.start()
        self.use_node(node)
        volume = self.create_volume(base.random_pieces((0, 24 * MiB)),
                                    node=node)
        e = self.assertRaises(exception.TargetFull, self.driver.backup,
                              self.create_backup(volume), None)
        self.assertEqual(errno.ENOSPC, e.errno)
        self.assertIn('target t has less free space than the data of '
                      'volume %s; backupfs says: ' % volume.id, str(e))

    def test_a_volume_being_restored_through_the_mount_is_busy(self):
        volume = self.create_volume(base.random_pieces((0, MiB)))
        restoring = os.open(os.path.join(self.node.mountpoint, 'volumes',
                                         'cinder', volume.id), os.O_WRONLY)
        self.addCleanup(os.close, restoring)
        e = self.assertRaises(exception.VolumeBusy, self.driver.backup,
                              self.create_backup(volume), None)
        self.assertEqual(errno.EBUSY, e.errno)
        self.assertIn('volume %s is busy' % volume.id, str(e))
        self.assertIn('backupfs says: ', str(e))

    def test_a_damaged_backup_fails_the_restore_and_writes_no_bad_data(self):
        pieces = base.random_pieces((0, 8 * MiB))
        volume = self.create_volume(pieces)
        backup = self.create_backup(volume)
        self.driver.backup(backup, None)
        # Bytes of block 5 flipped in the stored data, behind backupfs' back.
        stored = os.path.join(self.target_pool,
                              'backup-%s.img' % backup.service_metadata)
        with open(stored, 'r+b') as f:
            f.seek(5 * MiB + 1234)
            f.write(b'\xde\xad')
            os.fsync(f.fileno())
        new = self.create_volume(status='restoring-backup')
        e = self.assertRaises(exception.DamagedBackup, self.restore,
                              backup, new, True)
        self.assertEqual(errno.EIO, e.errno)
        self.assertIn('is damaged', str(e))
        # What was written is right; nothing of the damaged block is there.
        with open(self.node.volume_path(new.id), 'rb') as f:
            restored = f.read()
        self.assertGreaterEqual(len(restored), 4 * MiB)
        for block in range(0, len(restored), MiB):
            written = restored[block:block + MiB]
            if written.count(0) == len(written):
                continue  # not written
            self.assertNotEqual(5 * MiB, block, 'the damaged block is there')
            self.assertEqual(pieces[0][block:block + MiB], written)

    def test_metadata_too_large_to_keep_fails_the_backup_and_removes_it(self):
        # Linux keeps at most 64 KiB in one extended attribute.
        metadata = {'key%03d' % i: 'v' * 255 for i in range(300)}
        volume = self.create_volume(base.random_pieces((0, MiB)),
                                    metadata=metadata)
        backup = self.create_backup(volume)
        e = self.assertRaises(exception.MetadataNotStored,
                              self.driver.backup, backup, None)
        self.assertIn('keeping %s on backup %s on target t failed'
                      % (driver.METADATA_XATTR, backup.service_metadata),
                      str(e))
        self.assertIsNone(self.record(backup))

    def test_a_volume_that_fills_up_fails_with_its_own_error(self):
        # The volume's storage, not the backup, is at fault: ENOSPC as is.
        volume = self.create_volume(base.random_pieces((0, 24 * MiB)))
        backup = self.create_backup(volume)
        self.driver.backup(backup, None)
        backup.status = fields.BackupStatus.RESTORING
        backup.save()
        new = self.create_volume(status='restoring-backup')
        small = self.sandbox.small_fs('small', 16)
        with open(os.path.join(small, 'volume-%s' % new.id), 'wb') as f:
            e = self.assertRaises(OSError, self.driver.restore, backup,
                                  new.id, f, True)
        self.assertEqual(errno.ENOSPC, e.errno)

    def test_a_volume_with_cinder_snapshots_is_refused(self):
        volume = self.create_volume(base.random_pieces((0, MiB)))
        snapshot = test_utils.create_snapshot(self.ctxt, volume.id)
        backup = self.create_backup(volume)
        e = self.assertRaises(exception.NotSupported, self.driver.backup,
                              backup, None)
        self.assertIn('volume %s has Cinder snapshots (%s)'
                      % (volume.id, snapshot.id), str(e))
        # Cinder's own temporary snapshot for this backup is no obstacle.
        backup = self.create_backup(volume, temp_snapshot_id=snapshot.id)
        self.driver.backup(backup, None)
        self.assertEqual('available', self.record(backup)['status'])

    def test_a_backup_of_a_snapshot_is_refused(self):
        volume = self.create_volume(base.random_pieces((0, MiB)))
        backup = self.create_backup(volume, snapshot_id=str(uuid.uuid4()))
        e = self.assertRaises(exception.NotSupported, self.driver.backup,
                              backup, None)
        self.assertIn('backupfs backs up volumes, not Cinder snapshots',
                      str(e))


def mount_image(node, backup):
    return os.path.join(node.mountpoint, 'backups', backup.container,
                        '%s.img' % backup.service_metadata)


class NoFileno:
    """A volume file object that has no OS file descriptor to give."""

    def __init__(self, real):
        self.seek, self.write, self.flush = real.seek, real.write, real.flush

    def fileno(self):
        raise io.UnsupportedOperation('fileno')
