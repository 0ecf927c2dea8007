"""Backups: of one tenant (``tenant``: export and restore as the tenant, one signed file;
``archive``: that file's format) and of the cluster (``cluster``)."""
