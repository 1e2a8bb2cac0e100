"""Physical KV blocks: reference counts and a free queue with O(1) removal (pure Python).

The free queue is a doubly linked list threaded through two arrays, so a block can be pushed at
the tail, popped at the head and removed from the middle, each in O(1). Freed blocks go to the
tail and allocation takes the head, so the queue is also the LRU order of free blocks; the prefix
cache (:mod:`runtime.prefix_cache`) relies on that: a free block that still holds a cached prefix
can be revived by :meth:`BlockPool.incref` (removed from the middle) until allocation reaches it
and evicts it (the ``on_evict`` hook).
"""

from __future__ import annotations

from typing import Callable

from runtime.pool_memory import check_pool_fits

_NIL = -1


class NoFreeBlocksError(RuntimeError):
    """Raised by :meth:`BlockPool.allocate` when every block is in use."""


class FreeBlockQueue:
    """FIFO of block ids in ``[0, capacity)`` with O(1) push, pop and remove-from-middle.

    Parameters
    ----------
    capacity : int
        Number of block ids the queue may hold.
    initial : iterable of int, optional
        Blocks to push in order at construction.
    """

    def __init__(self, capacity: int, initial=()) -> None:
        self._prev = [_NIL] * capacity
        self._next = [_NIL] * capacity
        self._in = [False] * capacity
        self._head = _NIL
        self._tail = _NIL
        self._len = 0
        for b in initial:
            self.push(b)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block: int) -> bool:
        return 0 <= block < len(self._in) and self._in[block]

    def __iter__(self):
        b = self._head
        while b != _NIL:
            yield b
            b = self._next[b]

    def push(self, block: int) -> None:
        """Append ``block`` at the tail (most recently freed)."""
        if block in self:
            raise ValueError(f"block={block} is already in the free queue")
        self._in[block] = True
        self._prev[block] = self._tail
        self._next[block] = _NIL
        if self._tail == _NIL:
            self._head = block
        else:
            self._next[self._tail] = block
        self._tail = block
        self._len += 1

    def pop(self) -> int:
        """Remove and return the head (least recently freed) block."""
        if self._head == _NIL:
            raise NoFreeBlocksError("the free block queue is empty")
        block = self._head
        self.remove(block)
        return block

    def remove(self, block: int) -> None:
        """Unlink ``block`` from wherever it is in the queue."""
        if block not in self:
            raise ValueError(f"block={block} is not in the free queue")
        p, n = self._prev[block], self._next[block]
        if p == _NIL:
            self._head = n
        else:
            self._next[p] = n
        if n == _NIL:
            self._tail = p
        else:
            self._prev[n] = p
        self._prev[block] = self._next[block] = _NIL
        self._in[block] = False
        self._len -= 1


class BlockPool:
    """A fixed pool of ``num_blocks`` physical blocks with reference counts.

    Parameters
    ----------
    num_blocks : int
        Pool size (> 0). Block ids are ``0 .. num_blocks - 1``.

    Attributes
    ----------
    on_evict : callable(int) or None
        Called with a block id when :meth:`allocate` takes a free block for reuse, so an owner
        of extra per-block state (the prefix cache) can drop it.
    """

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        check_pool_fits(num_blocks, 0, 0, "cpu", given=f"num_blocks={num_blocks}")  # before the lists exist
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._free = FreeBlockQueue(num_blocks, range(num_blocks))
        self.on_evict: Callable[[int], None] | None = None

    @property
    def num_free(self) -> int:
        """Blocks with reference count 0 (including free blocks that still hold cached KV)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def _check(self, block: int) -> None:
        if not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ValueError(f"block={block!r} is out of range [0, {self.num_blocks})")

    def ref_count(self, block: int) -> int:
        self._check(block)
        return self._ref[block]

    def is_free(self, block: int) -> bool:
        self._check(block)
        return block in self._free

    def free_blocks(self) -> list[int]:
        """Free block ids in eviction order (head first); O(num_free), for tests and stats."""
        return list(self._free)

    def allocate(self) -> int:
        """Take the least recently freed block, give it reference count 1 and return its id.

        Raises
        ------
        NoFreeBlocksError
            If no block is free.
        """
        if not self._free:
            raise NoFreeBlocksError(f"all {self.num_blocks} blocks are in use")
        block = self._free.pop()
        if self.on_evict is not None:
            self.on_evict(block)
        self._ref[block] = 1
        return block

    def incref(self, block: int) -> None:
        """Add a reference; a free block (a cached prefix block) is taken out of the free queue."""
        self._check(block)
        if self._ref[block] == 0:
            self._free.remove(block)
        self._ref[block] += 1

    def decref(self, block: int) -> int:
        """Drop a reference and return the new count; at 0 the block joins the free queue's tail."""
        self._check(block)
        if self._ref[block] <= 0:
            raise ValueError(f"block={block} is already free (reference count 0)")
        self._ref[block] -= 1
        if self._ref[block] == 0:
            self._free.push(block)
        return self._ref[block]
