"""Building indexes: incremental ingest, distributed shards, blue/green reindexing."""
