"""Cinder backup driver for backupfs: Cinder's backups made by backupfs.

``backupfs_cinder.driver.BackupfsBackupDriver`` is the driver;
``backupfs_cinder.mount`` speaks to the mounted backupfs tree and
``backupfs_cinder.exception`` names the ways it can fail.
"""
