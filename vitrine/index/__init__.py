"""The index directory: FAISS structure + SQLite store, its layout, generations and integrity."""
