"""Real backupfs daemons on real files for the driver's tests.

A Sandbox is one test's directory; a Node in it is one Cinder node's backupfs:
backend ``cinder`` (a pool of volume files, ``volume-<id>``), backend
``store`` whose pool is target ``t``, a state directory, a runtime directory
and a mountpoint. Its backupfs node name is the Node's name, so several nodes
can serve the target's pool directory at once (and share a volume pool), as
several backup hosts do: the same configuration but ``node`` and
``state_dir``. Sandbox.cleanup() undoes
everything, also after a failed test: daemons stopped, mounts detached, loop
devices freed, and the directory removed only once nothing is mounted in it.
The daemon is the binary named by $BACKUPFS_BIN.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

BIN = os.environ.get('BACKUPFS_BIN')
# Taken at import: Cinder's test base later points tempfile at a directory it
# removes after each test, whatever is still mounted in it.
BASE_DIR = tempfile.gettempdir()
MiB = 1024 * 1024
GiB = 1024 * MiB


def run(*argv):
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def is_mounted(path):
    with open('/proc/self/mountinfo') as mountinfo:
        return any(line.split()[4] == path for line in mountinfo)


class Sandbox:
    """One test's directory, and what is mounted and attached in it."""

    def __init__(self):
        if not BIN or not os.access(BIN, os.X_OK):
            raise RuntimeError('set BACKUPFS_BIN to the backupfs binary '
                               '(cargo build: target/debug/backupfs)')
        self.dir = tempfile.mkdtemp(prefix='backupfs-cinder-', dir=BASE_DIR)
        self._nodes = []
        self._mounts = []
        self._loops = []

    def mkdir(self, name):
        path = os.path.join(self.dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def loop(self, path):
        """A loop device on the file: a block device, as volumes attach."""
        device = subprocess.run(['losetup', '-f', '--show', path],
                                check=True, capture_output=True,
                                text=True).stdout.strip()
        self._loops.append(device)
        return device

    def unloop(self, device):
        run('losetup', '-d', device)
        self._loops.remove(device)

    def small_fs(self, name, size_mb):
        """An ext4 filesystem of ``size_mb`` MiB on a loop device."""
        image = os.path.join(self.dir, name + '.fsimg')
        with open(image, 'wb') as f:
            f.truncate(size_mb * MiB)
        run('mkfs.ext4', '-q', '-F', image)
        device = self.loop(image)
        mountpoint = self.mkdir(name)
        run('mount', device, mountpoint)
        self._mounts.append(mountpoint)
        return mountpoint

    def xfs(self, name, size_mb):
        """An XFS filesystem (reflinks, as incremental backups want) on a loop
        device: a sparse file of ``size_mb`` MiB."""
        image = os.path.join(self.dir, name + '.fsimg')
        with open(image, 'wb') as f:
            f.truncate(size_mb * MiB)
        run('mkfs.xfs', '-q', '-f', image)
        device = self.loop(image)
        mountpoint = self.mkdir(name)
        run('mount', device, mountpoint)
        self._mounts.append(mountpoint)
        return mountpoint

    def node(self, name, target_pool, volume_pool=None, env=None):
        node = Node(self, name, target_pool, volume_pool, env)
        self._nodes.append(node)
        return node

    def cleanup(self):
        for node in reversed(self._nodes):
            node.stop()
        for mountpoint in reversed(self._mounts):
            subprocess.run(['umount', '-l', mountpoint],
                           stderr=subprocess.DEVNULL)
        for device in reversed(self._loops):
            subprocess.run(['losetup', '-d', device],
                           stderr=subprocess.DEVNULL)
        with open('/proc/self/mountinfo') as mountinfo:
            busy = any(self.dir in line for line in mountinfo)
        if not busy:
            shutil.rmtree(self.dir, ignore_errors=True)


class Node:
    """backupfs on one Cinder node: its volume pool, target ``t``, mount.

    ``env`` is added to the daemon's environment (e.g. backupfs' test hook
    BACKUPFS_TEST_PAUSE, which holds a job at a given point).
    """

    def __init__(self, sandbox, name, target_pool, volume_pool=None,
                 env=None):
        self.name = name
        self.env = dict(env or {})
        if volume_pool is None:
            volume_pool = sandbox.mkdir(name + '-volumes')
        os.makedirs(volume_pool, exist_ok=True)
        self.pool = volume_pool
        self.mountpoint = sandbox.mkdir(name + '-mnt')
        self.log_path = os.path.join(sandbox.dir, name + '.log')
        self.config = os.path.join(sandbox.dir, name + '.toml')
        self.runtime_dir = sandbox.mkdir(name + '-run')
        with open(self.config, 'w') as f:
            f.write('node = "%s"\n'
                    'state_dir = "%s"\n'
                    '[backends.cinder]\ndriver = "file"\n'
                    'pools = { volumes = "%s" }\n'
                    '[backends.store]\ndriver = "file"\n'
                    'pools = { backups = "%s" }\n'
                    '[targets.t]\nbackend = "store"\npool = "backups"\n'
                    % (name, sandbox.mkdir(name + '-state'), self.pool,
                       target_pool))
        self.process = None

    def volume_path(self, volume_id):
        return os.path.join(self.pool, 'volume-%s' % volume_id)

    def log(self):
        with open(self.log_path, errors='replace') as f:
            return f.read()

    def start(self):
        """Starts the daemon; returns once its tree answers."""
        log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(
            [BIN, 'mount', self.mountpoint, '--config', self.config],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=self._environment())
        log.close()
        deadline = time.monotonic() + 20
        while not ('backupfs mounted' in self.log() and
                   os.path.isdir(os.path.join(self.mountpoint, 'backups'))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError('backupfs did not mount; its log:\n'
                                   + self.log())
            time.sleep(0.05)

    def _environment(self):
        env = {name: value for name, value in os.environ.items()
               if not name.startswith('BACKUPFS_TEST_')}
        env['RUNTIME_DIRECTORY'] = self.runtime_dir
        env.update(self.env)
        return env

    def stop(self):
        """SIGTERM, as systemd stops it; the mount is gone afterwards."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if is_mounted(self.mountpoint):
            subprocess.run(['umount', '-l', self.mountpoint],
                           stderr=subprocess.DEVNULL)
