"""Cinder's backup manager driving the driver, as cinder-backup runs it.

One create, restore and delete round through ``BackupManager``, the way
Cinder's test_backup.py drives it. What runs elsewhere in a real Cinder, the
volume service behind RPC, is replaced by its answers: the backup device is
the volume itself, and ``initialize_connection`` hands out the volume's file
through os-brick's ``local`` connector, as an NFS-style volume driver would.
So are this host's connector properties, which os-brick gathers with
privileged commands. The rest of the backup side is Cinder's own code.
"""

import os

from oslo_config import cfg
from oslo_service import loopingcall
from oslo_utils import importutils

from cinder import exception as cinder_exception
from cinder import objects
from cinder.objects import fields

from backupfs_cinder import exception
from tests import base
from tests.base import GiB

CONF = cfg.CONF

VOLUME_RPC = 'cinder.volume.rpcapi.VolumeAPI.'


class ManagerTestCase(base.BackupfsTestCase):
    """Cinder's backup manager with the volume service's answers stubbed."""

    def setUp(self):
        super().setUp()
        self.override_config('backup_driver',
                             'backupfs_cinder.driver.BackupfsBackupDriver')
        for name in ('get_backup_device', 'terminate_connection',
                     'remove_export'):
            self.patch(VOLUME_RPC + name)
        self.patch(VOLUME_RPC + 'secure_file_operations_enabled',
                   return_value=False)
        self.patch(VOLUME_RPC + 'initialize_connection',
                   side_effect=self._connection)
        self.patch('cinder.volume.volume_utils.'
                   'brick_get_connector_properties', return_value={})
        self.manager = importutils.import_object(CONF.backup_manager)
        self.manager.host = 'testhost'
        self.device_paths = {}

    def _connection(self, context, volume, properties):
        path = self.device_paths.get(volume.id,
                                     self.node.volume_path(volume.id))
        return {'driver_volume_type': 'local',
                'data': {'device_path': path}}

    def _backup_device(self, volume):
        return objects.BackupDeviceInfo.from_primitive(
            {'backup_device': volume, 'secure_enabled': False,
             'is_snapshot': False}, self.ctxt)


class BackupManagerTest(ManagerTestCase):

    def test_create_restore_delete_round(self):
        # The manager checks the driver's set-up before it takes any work.
        self.assertRaises(loopingcall.LoopingCallDone,
                          self.manager._setup_backup_driver, self.ctxt)
        self.assertTrue(self.manager.is_working())

        pieces = base.random_pieces(*base.SPARSE)
        volume = self.create_volume(pieces, status='backing-up',
                                    previous_status='available',
                                    metadata={'tier': 'gold'})
        backup = self.create_backup(volume)
        self.manager.create_backup(self.ctxt, backup)
        self.manager.continue_backup(self.ctxt, backup,
                                     self._backup_device(volume))

        backup = objects.Backup.get_by_id(self.ctxt, backup.id)
        self.assertEqual(fields.BackupStatus.AVAILABLE, backup.status)
        self.assertEqual('t', backup.container)
        self.assertEqual(backup.id, self.record(backup)['name'])
        self.assertEqual('available',
                         objects.Volume.get_by_id(self.ctxt,
                                                  volume.id).status)

        new = self.create_volume(status='restoring-backup',
                                 display_name='restore_backup_%s' % backup.id)
        with open(self.node.volume_path(new.id), 'wb') as f:
            f.truncate(GiB)  # what the volume driver made
        backup.status = fields.BackupStatus.RESTORING
        backup.save()
        self.manager.restore_backup(self.ctxt, backup, new.id, True)

        new = objects.Volume.get_by_id(self.ctxt, new.id)
        self.assertEqual('available', new.status)
        self.assertEqual('gold', new.metadata['tier'])
        self.assertEqual(backup.id, new.metadata['src_backup_id'])
        self.assertContent(self.node.volume_path(new.id), pieces)

        backup.status = fields.BackupStatus.DELETING
        backup.save()
        backupfs_id = backup.service_metadata
        self.manager.delete_backup(self.ctxt, backup)
        self.assertRaises(cinder_exception.BackupNotFound,
                          objects.Backup.get_by_id, self.ctxt, backup.id)
        self.assertIsNone(self.backupfs_record(backupfs_id))

    def test_a_failed_backup_is_an_error_in_cinder_with_the_reason(self):
        # A volume Cinder can attach, but in no pool backupfs serves.
        volume = self.create_volume(status='backing-up',
                                    previous_status='available')
        elsewhere = os.path.join(self.sandbox.mkdir('elsewhere'),
                                 'volume-%s' % volume.id)
        base.write_pieces(elsewhere, base.random_pieces((0, 1024)), GiB)
        self.device_paths[volume.id] = elsewhere
        backup = self.create_backup(volume)
        self.manager.is_initialized = True
        self.manager.create_backup(self.ctxt, backup)
        self.assertRaises(exception.VolumeNotServed,
                          self.manager.continue_backup, self.ctxt, backup,
                          self._backup_device(volume))
        backup = objects.Backup.get_by_id(self.ctxt, backup.id)
        self.assertEqual(fields.BackupStatus.ERROR, backup.status)
        self.assertIn('volume %s is not on any backend that backupfs serves'
                      % volume.id, backup.fail_reason)
        volume = objects.Volume.get_by_id(self.ctxt, volume.id)
        self.assertEqual('available', volume.status)
