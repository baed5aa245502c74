"""Catalogs: readers that turn folders, manifests and saved datasets into records."""
