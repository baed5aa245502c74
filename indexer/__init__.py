"""``python -m indexer``: build, update, inspect and query Vitrine indexes from the command line."""
