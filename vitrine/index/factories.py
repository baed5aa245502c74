"""Names of built FAISS structures: a snapshot file stores no factory string, so the structure that was
loaded is described in factory syntax (``HNSW32``, ``IVF1024,SQ8``, ``OPQ16,IVF256,PQ16,RFlat``...)."""

from __future__ import annotations

import faiss

_SQ_NAMES = {
    faiss.ScalarQuantizer.QT_8bit: "SQ8",
    faiss.ScalarQuantizer.QT_4bit: "SQ4",
    faiss.ScalarQuantizer.QT_6bit: "SQ6",
    faiss.ScalarQuantizer.QT_fp16: "SQfp16",
}


def describe(index: faiss.Index) -> str:
    """Factory-like name of a built structure (a snapshot file stores no factory string)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap):
        return describe(idx.index)
    if isinstance(idx, faiss.IndexRefine):
        tail = "RFlat" if isinstance(idx, faiss.IndexRefineFlat) else f"Refine({describe(idx.refine_index)})"
        return f"{describe(idx.base_index)},{tail}"
    if isinstance(idx, faiss.IndexPreTransform):
        steps = [faiss.downcast_VectorTransform(idx.chain.at(i)) for i in range(idx.chain.size())]
        names = [f"OPQ{t.M}" if isinstance(t, faiss.OPQMatrix) else type(t).__name__ for t in steps]
        return ",".join([*names, describe(idx.index)])
    if isinstance(idx, faiss.IndexHNSWFlat):
        return f"HNSW{idx.hnsw.nb_neighbors(1)}"
    prefix = f"IVF{idx.nlist}," if isinstance(idx, faiss.IndexIVF) else ""
    if isinstance(idx, (faiss.IndexFlat, faiss.IndexIVFFlat)):
        return prefix + "Flat"
    if isinstance(idx, (faiss.IndexScalarQuantizer, faiss.IndexIVFScalarQuantizer)):
        return prefix + _SQ_NAMES.get(idx.sq.qtype, "SQ")
    if isinstance(idx, (faiss.IndexPQFastScan, faiss.IndexIVFPQFastScan)):
        return prefix + f"PQ{idx.pq.M}x{idx.pq.nbits}fs"
    if isinstance(idx, (faiss.IndexPQ, faiss.IndexIVFPQ)):
        return prefix + f"PQ{idx.pq.M}" + ("" if idx.pq.nbits == 8 else f"x{idx.pq.nbits}")
    return prefix + type(idx).__name__
