"""Near-duplicate search in near-linear time: MinHash signatures and LSH banding (datasketch), then exact checks.

Comparing every pair of rows is quadratic: 60,000 SST-2 phrases are 1.8 billion pairs. MinHash gives each
text a 128-number signature whose agreement with another's estimates the Jaccard similarity of their
shingle sets; LSH (locality-sensitive hashing) buckets the signatures in bands so that only texts likely to
be similar are ever compared. Every candidate LSH proposes is then verified with the exact Jaccard of the
two shingle sets, so a reported pair really is that similar: LSH can only miss pairs, never invent them.

Shingles are word 3-grams of the normalised text (case folded, punctuation dropped), the usual unit of
web-scale deduplication. A 40-word text with one word changed keeps about 0.86 of its 3-grams; with a
word changed in every ten, about 0.5. Texts under MIN_WORDS words have too few 3-grams for a similarity
to mean anything: for them only the exact-duplicate check speaks.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from dataclasses import dataclass

THRESHOLD = 0.8  # Jaccard of word 3-grams at or above which two texts are near duplicates
NUM_PERM = 128  # signature length: the estimate's standard error is about 1/sqrt(128) = 0.09
# LSH bands are tuned for a lower similarity than THRESHOLD: banding finds a pair right at its own threshold
# only about half the time, so a 0.8 pair would often be missed. Candidates are verified exactly anyway.
LSH_THRESHOLD = 0.6
MIN_WORDS = 8
SHINGLE = 3
_WORD = re.compile(r"\w+")


def normalise(text: str) -> str:
    """The form two texts are compared in for exact duplicates: Unicode-normalised, case folded, whitespace
    collapsed ("Great  film" and "great film" are the same row)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(text: str) -> frozenset[bytes] | None:
    """Word 3-grams of a normalised text, or None when it is too short to compare by similarity."""
    words = _WORD.findall(text)
    if len(words) < MIN_WORDS:
        return None
    return frozenset(" ".join(words[i:i + SHINGLE]).encode("utf-8") for i in range(len(words) - SHINGLE + 1))


def _hash32(data: bytes) -> int:
    # crc32 instead of datasketch's default sha1: a C call a few times faster, and 32 bits is all MinHash uses.
    return zlib.crc32(data)


@dataclass
class Match:
    row: int  # index of the later (or the --against) row
    other: int  # index of the earlier row it resembles (in the same file, or in the training files)
    similarity: float  # exact Jaccard of the two shingle sets


class NearDuplicateIndex:
    """An LSH index over shingle sets; query() returns the indexed keys whose exact Jaccard is >= threshold."""

    def __init__(self, threshold: float = THRESHOLD, num_perm: int = NUM_PERM):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=LSH_THRESHOLD, num_perm=num_perm)
        self.sets: dict[int, frozenset[bytes]] = {}

    def signatures(self, sets: list[frozenset[bytes]]) -> list:
        """MinHash signatures of many sets at once: MinHash.bulk shares one set of permutations, where one
        MinHash object per row would draw its own (6x slower on SST-2's 60,000 rows)."""
        from datasketch import MinHash

        return MinHash.bulk([list(x) for x in sets], num_perm=self.num_perm, seed=1, hashfunc=_hash32)

    def add(self, key: int, sets: frozenset[bytes], signature) -> None:
        self.lsh.insert(key, signature, check_duplication=False)
        self.sets[key] = sets

    def query(self, sets: frozenset[bytes], signature) -> list[tuple[int, float]]:
        """Indexed keys whose exact Jaccard with `sets` reaches the threshold, most similar first."""
        found = []
        for key in self.lsh.query(signature):
            other = self.sets[key]
            similarity = len(sets & other) / len(sets | other)
            if similarity >= self.threshold:
                found.append((key, similarity))
        return sorted(found, key=lambda kv: (-kv[1], kv[0]))


def _shingled(texts: list[str], skip: set[int]) -> list[tuple[int, frozenset[bytes]]]:
    return [(i, sets) for i, text in enumerate(texts) if i not in skip and (sets := shingles(text)) is not None]


def near_duplicates_within(texts: list[str], skip: set[int]) -> tuple[list[Match], NearDuplicateIndex]:
    """Rows with an earlier row of the same list at or above the threshold (rows in `skip`, the exact
    duplicates, are left out: they are reported as such). Also returns the index of every row, which
    near_matches_across reuses for leakage instead of hashing the file again."""
    index = NearDuplicateIndex()
    rows = _shingled(texts, skip)
    matches = []
    for (i, sets), signature in zip(rows, index.signatures([s for _, s in rows]), strict=True):
        hits = index.query(sets, signature)
        if hits:
            matches.append(Match(i, hits[0][0], round(hits[0][1], 3)))
        index.add(i, sets, signature)
    return matches, index


def near_matches_across(indexes: list[NearDuplicateIndex], queries: list[str],
                        skip: set[int]) -> list[tuple[Match, int]]:
    """For each query text (not in `skip`), its most similar text in any of the indexes (one per checked
    file) at or above the threshold: (match, which index)."""
    asked = _shingled(queries, skip)
    matches = []
    signatures = indexes[0].signatures([s for _, s in asked]) if indexes else []
    for (j, sets), signature in zip(asked, signatures, strict=True):
        best = None
        for n, index in enumerate(indexes):
            hits = index.query(sets, signature)
            if hits and (best is None or hits[0][1] > best[0].similarity):
                best = (Match(j, hits[0][0], round(hits[0][1], 3)), n)
        if best is not None:
            matches.append(best)
    return matches
