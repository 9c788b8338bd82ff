"""One step of contrib/bench/cinder.sh, run by Cinder's own code.

Each step is a process of its own, so that its peak RSS is its own:

    cinder_bench.py STATE init VOLUME_DIR SIZE_GB  Cinder's database, and a
                                                   volume of random data
    cinder_bench.py STATE idle                     Cinder imported, no more
    cinder_bench.py STATE backup DRIVER            a backup of that volume
    cinder_bench.py STATE restore DRIVER           its restore, to a new volume
    cinder_bench.py STATE delete DRIVER            that backup deleted

DRIVER is ``posix`` (Cinder's PosixBackupDriver with its defaults: zlib,
backup_file_size, SHA blocks) or ``backupfs``. Volumes and backups are Cinder
objects in a SQLite database beside STATE (a JSON file of what the steps
made), configured by a cinder.conf there. A step prints ``seconds <time of
the driver call>`` last. A restore opens the new volume with 'wb', as
Cinder's backup manager does.
"""

import json
import os
import sys
import time

from oslo_config import cfg

from cinder.common import config  # noqa: F401 (registers Cinder's options)
from cinder import context
from cinder.db import migration
from cinder import objects
from cinder.objects import fields
from cinder import rpc

CONF = cfg.CONF
MiB = 1024 * 1024


def setup(state_path):
    """Cinder configured as a cinder.conf beside STATE says."""
    directory = os.path.dirname(os.path.abspath(state_path))
    conf_file = os.path.join(directory, 'cinder.conf')
    if not os.path.exists(conf_file):
        with open(conf_file, 'w') as f:
            f.write('[DEFAULT]\ntransport_url = fake:/\n'
                    '[oslo_messaging_notifications]\ndriver = noop\n'
                    '[database]\nconnection = sqlite:///%s/cinder.sqlite\n'
                    '[oslo_concurrency]\nlock_path = %s\n'
                    % (directory, directory))
    CONF([], project='cinder', default_config_files=[conf_file])
    objects.register_all()
    rpc.init(CONF)
    return context.get_admin_context()


def load(state_path):
    with open(state_path) as f:
        return json.load(f)


def save(state_path, state):
    with open(state_path, 'w') as f:
        json.dump(state, f)


def new_volume(ctxt, status, size_gb):
    volume = objects.Volume(ctxt, size=size_gb, status=status, host='bench',
                            user_id='bench', project_id='bench',
                            display_name='bench', availability_zone='nova')
    volume.create()
    return volume


def driver_for(name, ctxt, state):
    if name == 'posix':
        from cinder.backup.drivers import posix
        CONF.set_override('backup_posix_path', state['posix_path'])
        return posix.PosixBackupDriver(ctxt)
    from backupfs_cinder import driver
    CONF.set_override('backupfs_mountpoint', state['mountpoint'])
    CONF.set_override('backupfs_target', state['target'])
    return driver.BackupfsBackupDriver(ctxt)


def main(state_path, step, *args):
    ctxt = setup(state_path)
    if step == 'init':
        volume_dir, size_gb = args[0], int(args[1])
        migration.db_sync()
        volume = new_volume(ctxt, 'available', size_gb)
        path = os.path.join(volume_dir, 'volume-%s' % volume.id)
        with open(path, 'wb') as f:
            for _ in range(size_gb * 256):
                f.write(os.urandom(4 * MiB))
            os.fsync(f.fileno())
        state = load(state_path)
        state.update(volume_id=volume.id, volume_dir=volume_dir,
                     size_gb=size_gb)
        save(state_path, state)
        return
    if step == 'idle':
        print('seconds 0')
        return
    name = args[0]
    state = load(state_path)
    backup_driver = driver_for(name, ctxt, state)
    if step == 'backup':
        backup = objects.Backup(ctxt, volume_id=state['volume_id'],
                                status=fields.BackupStatus.CREATING,
                                user_id='bench', project_id='bench',
                                display_name='bench', size=state['size_gb'])
        backup.create()
        path = os.path.join(state['volume_dir'],
                            'volume-%s' % state['volume_id'])
        started = time.monotonic()
        with open(path, 'rb') as volume_file:
            backup_driver.backup(backup, volume_file)
        seconds = time.monotonic() - started
        state['backup_' + name] = backup.id
    elif step == 'restore':
        backup = objects.Backup.get_by_id(ctxt, state['backup_' + name])
        backup.status = fields.BackupStatus.RESTORING
        backup.save()
        volume = new_volume(ctxt, 'restoring-backup', state['size_gb'])
        path = os.path.join(state['volume_dir'], 'volume-%s' % volume.id)
        started = time.monotonic()
        with open(path, 'wb') as volume_file:
            backup_driver.restore(backup, volume.id, volume_file, True)
        seconds = time.monotonic() - started
        state['restored_' + name] = path
    elif step == 'delete':
        backup = objects.Backup.get_by_id(ctxt, state['backup_' + name])
        started = time.monotonic()
        backup_driver.delete_backup(backup)
        seconds = time.monotonic() - started
    else:
        raise SystemExit('unknown step %s' % step)
    save(state_path, state)
    print('seconds %.3f' % seconds)


if __name__ == '__main__':
    main(*sys.argv[1:])
