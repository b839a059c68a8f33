"""RFC 6962 consistency proofs: generated against the recursive definition, verified by the
RFC 9162 algorithm, and refused when anything in them is changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import insert

from dmp.audit.merkle import leaf_hash, merkle_root, node_hash
from dmp.audit.merkle_proofs import LeafSubtrees, consistency_proof, verify_consistency
from dmp.audit.tables import audit_tables
from dmp.db import make_engine, new_metadata

LEAVES = [leaf_hash(f"entry {i}".encode()) for i in range(70)]


def _range(start: int, end: int) -> bytes:
    return merkle_root(LEAVES[start:end])


def _reference(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    """SUBPROOF of RFC 6962 §2.1.2, word for word."""
    n = len(leaves)
    if m == n:
        return [] if complete else [merkle_root(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*_reference(m, leaves[:k], complete), merkle_root(leaves[k:])]
    return [*_reference(m - k, leaves[k:], False), merkle_root(leaves[:k])]


def test_rfc_6962_example_tree_of_seven_leaves() -> None:
    # §2.1.3: the proof from 3 to 7 leaves is [c, d, g, l] in the RFC's names.
    a, b, c, d, e, f, g = LEAVES[:7]
    j, k, i = node_hash(c, d), node_hash(e, f), node_hash(a, b)
    l_ = node_hash(k, g)
    assert consistency_proof(3, 7, _range) == [c, d, i, l_]
    assert consistency_proof(4, 7, _range) == [l_]
    assert consistency_proof(6, 7, _range) == [k, g, node_hash(i, j)]


def test_every_proof_matches_the_definition_and_verifies() -> None:
    for n in range(1, len(LEAVES) + 1):
        new_root = merkle_root(LEAVES[:n])
        for m in range(1, n + 1):
            proof = consistency_proof(m, n, _range)
            assert proof == _reference(m, LEAVES[:n], True), (m, n)
            old_root = merkle_root(LEAVES[:m])
            assert verify_consistency(m, n, old_root, new_root, proof), (m, n)


@pytest.mark.parametrize(("m", "n"), [(1, 2), (3, 7), (5, 8), (8, 33), (17, 70), (64, 65)])
def test_a_changed_proof_root_or_size_is_refused(m: int, n: int) -> None:
    old_root, new_root = merkle_root(LEAVES[:m]), merkle_root(LEAVES[:n])
    proof = consistency_proof(m, n, _range)
    forged = hashlib.sha256(b"forged").digest()
    assert not verify_consistency(m, n, forged, new_root, proof)
    assert not verify_consistency(m, n, old_root, forged, proof)
    for i in range(len(proof)):
        changed = list(proof)
        changed[i] = forged
        assert not verify_consistency(m, n, old_root, new_root, changed)
    assert not verify_consistency(m, n, old_root, new_root, [*proof, forged])
    if proof:
        assert not verify_consistency(m, n, old_root, new_root, proof[:-1])
    assert not verify_consistency(m + 1, n, merkle_root(LEAVES[: m + 1]), new_root, proof)


def test_a_rewritten_prefix_is_not_consistent() -> None:
    rewritten = [*LEAVES[:10], leaf_hash(b"inserted"), *LEAVES[11:40]]
    old_root = merkle_root(LEAVES[:20])
    proof = consistency_proof(20, 40, lambda s, e: merkle_root(rewritten[s:e]))
    assert not verify_consistency(20, 40, old_root, merkle_root(rewritten), proof)


def test_equal_and_empty_trees() -> None:
    root = merkle_root(LEAVES[:5])
    assert verify_consistency(5, 5, root, root, [])
    assert not verify_consistency(5, 5, root, merkle_root(LEAVES[:4]), [])
    assert verify_consistency(0, 5, merkle_root([]), root, [])
    assert not verify_consistency(6, 5, root, root, [])
    with pytest.raises(ValueError):
        consistency_proof(6, 5, _range)


def test_a_kept_proof_is_the_one_computed_and_cannot_be_changed_by_a_caller(
    tmp_path: Path,
) -> None:
    """LeafSubtrees keeps its latest proofs for the next witness asking the same: each
    gets the proof of the stored leaves, and changing one's copy changes no other's."""
    metadata = new_metadata()
    events, _ = audit_tables(metadata)
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(events),
            [
                {
                    "seq": i + 1,
                    "event_json": "{}",
                    "leaf_hash": leaf,
                    "event_date_time": 0,
                    "participant_object_patient_ins": "",
                    "request_id": "",
                }
                for i, leaf in enumerate(LEAVES)
            ],
        )
    subtrees = LeafSubtrees(engine, events)
    try:
        for m, n in ((3, 7), (20, 70), (64, 65)):
            first = subtrees.consistency(m, n)
            assert first == consistency_proof(m, n, _range)
            first.append(b"tampered by a caller")
            first[0] = b"x" * 32
            assert subtrees.consistency(m, n) == consistency_proof(m, n, _range)
    finally:
        engine.dispose()
