"""Prefix caching: full KV blocks keyed by a chained hash of their tokens (pure Python).

Block ``i`` of a sequence is keyed by ``BlockHash(hash((parent.value, tokens)), tokens)`` where
``parent`` is the key of block ``i - 1`` and ``tokens`` the block's ``block_size`` token ids, so a
key names the whole prefix up to the end of its block. Key equality also compares the block's own
token ids, so a 64-bit collision would need a colliding parent *and* identical tokens.

Only full blocks whose KV has been computed are registered. A cached block keeps its key after
its last reference is dropped: it waits in the pool's free queue (LRU order, since freed blocks go
to the tail and allocation takes the head) and a later request can revive it with
``BlockPool.incref``. When allocation reaches it, the pool's ``on_evict`` hook drops its key here.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence as Seq

from runtime.block_pool import BlockPool


class BlockHash(NamedTuple):
    """Key of one full block: chained hash value plus the block's own token ids."""

    value: int
    token_ids: tuple[int, ...]


def hash_block(parent: BlockHash | None, token_ids: Seq[int]) -> BlockHash:
    """Key of a block holding ``token_ids`` whose preceding block has key ``parent`` (None: first)."""
    tokens = tuple(token_ids)
    return BlockHash(hash((None if parent is None else parent.value, tokens)), tokens)


def extend_block_hashes(hashes: list[BlockHash], token_ids: Seq[int], block_size: int,
                        num_full_blocks: int) -> list[BlockHash]:
    """Append keys to ``hashes`` (a chain for ``token_ids``) until it covers ``num_full_blocks``.

    Parameters
    ----------
    hashes : list[BlockHash]
        Keys of the first ``len(hashes)`` blocks; extended in place and returned.
    token_ids : sequence of int
        The sequence's tokens, at least ``num_full_blocks * block_size`` of them.
    block_size : int
    num_full_blocks : int
    """
    if num_full_blocks * block_size > len(token_ids):
        raise ValueError(f"num_full_blocks={num_full_blocks} needs {num_full_blocks * block_size} tokens, "
                         f"have {len(token_ids)}")
    for i in range(len(hashes), num_full_blocks):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size]))
    return hashes


class PrefixCache:
    """Map from :class:`BlockHash` to the physical block holding that prefix's KV.

    Parameters
    ----------
    pool : BlockPool
        The pool whose blocks are cached; this object installs itself as ``pool.on_evict``.
    """

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self.num_evictions = 0
        pool.on_evict = self._evict

    def __len__(self) -> int:
        return len(self._block_of)

    def lookup(self, key: BlockHash) -> int | None:
        """The block caching ``key``, in use or free-but-not-yet-evicted; None if absent."""
        return self._block_of.get(key)

    def hash_of(self, block: int) -> BlockHash | None:
        return self._hash_of.get(block)

    def insert(self, key: BlockHash, block: int) -> bool:
        """Register ``block`` (full, computed, in use) under ``key``.

        Returns False and changes nothing when ``key`` is already cached (by this or another
        block: the duplicate stays unregistered and is simply freed later) or ``block`` already
        has a key.
        """
        if self.pool.ref_count(block) == 0:
            raise ValueError(f"block={block} is free; only blocks in use can be cached")
        if key in self._block_of or block in self._hash_of:
            return False
        self._block_of[key] = block
        self._hash_of[block] = key
        return True

    def entries(self) -> list[tuple[BlockHash, int]]:
        """All ``(key, block)`` pairs, for tests and debugging."""
        return list(self._block_of.items())

    def num_evictable(self) -> int:
        """Cached blocks with no reference (reusable until evicted); O(cached blocks)."""
        return sum(1 for b in self._hash_of if self.pool.ref_count(b) == 0)

    def _evict(self, block: int) -> None:
        key = self._hash_of.pop(block, None)
        if key is not None:
            del self._block_of[key]
            self.num_evictions += 1
