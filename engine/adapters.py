"""The LoRA adapters an engine serves: a registry with three tiers and LRU between them.

- ON_DISK: registered, with its path and the facts its validation found (rank, targets,
  size); its tensors are read back from disk when a request needs them.
- HOST: its tensors are in host memory. At most `host_cache` registered adapters are, except
  while more distinct adapters than that are in flight (their tensors cannot go): the cache
  then shrinks back as they finish.
- DEVICE: also in one of the `slots` of the stacked copy the forward pass reads
  (engine.lora.AdapterStacks, owned by the step thread, which reports its slots here). The
  scheduler never runs more distinct adapters at once than there are slots.

Eviction is LRU among idle (no request in flight holds them), unpinned adapters, in both
tiers. Pinned adapters never leave host memory; from a slot they go last, only when every other
slot is in use (so pins cannot lock other adapters out of the slots).

Threads: files are read by `register` and `hold` (the callers run them in an executor, never
on the step thread); the step thread calls `release`, `set_device` and `victim_key`, which
never touch the disk. One lock guards the maps; disk reads happen outside it.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.lora import AdapterUse, LoraAdapter, load_adapter
from engine.types import (
    AdapterError,
    AdapterInfo,
    AdapterState,
    AlreadyExists,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
)

AdapterRefs = Sequence[tuple[str, float]]


@dataclass(eq=False)
class _Entry:
    adapter_id: str
    path: str
    rank: int
    targets: tuple[str, ...]
    size_bytes: int
    pinned: bool
    adapter: LoraAdapter | None = None  # the host copy; None: on disk only
    users: int = 0  # requests in flight holding it
    last_used: int = 0  # LRU clock
    registered: bool = True  # False once unloaded (in-flight requests may still hold it)
    # Serialises reads of its files so that concurrent requests read them once.
    load_lock: threading.Lock = field(default_factory=threading.Lock)


class AdapterRegistry:
    def __init__(
        self, model_config: ModelConfig, dtype: torch.dtype, slots: int, host_cache: int
    ) -> None:
        if slots < 1 or host_cache < slots:
            raise ValueError(f"need 1 <= adapter slots ({slots}) <= host cache ({host_cache})")
        self.model_config = model_config
        self.dtype = dtype
        self.slots = slots
        self.host_cache = host_cache
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        # Entries whose tensors are in memory, by the tensors' uid (what sequences and slots
        # refer to); unloaded ones stay until their last request releases them.
        self._by_uid: dict[int, _Entry] = {}
        self._num_loaded = 0  # registered entries with tensors in memory
        self._device: frozenset[int] = frozenset()
        self._clock = itertools.count(1)

    # ---- registration -------------------------------------------------------------------------

    def register(self, adapter_id: str, path: str | Path, pin: bool = False) -> LoraAdapter:
        """Read and validate a PEFT directory, then register it (blocking: reads files)."""
        with self._lock:
            self._check_new(adapter_id, pin)  # fail before reading files when we can
        adapter = load_adapter(path, self.model_config, self.dtype)
        self.add(adapter_id, adapter, pin)
        return adapter

    def add(self, adapter_id: str, adapter: LoraAdapter, pin: bool = False) -> None:
        """Register an adapter already in memory; it enters the host cache as most recent."""
        if not adapter.fits(self.model_config):
            raise AdapterError(f"adapter {adapter_id!r} was loaded for a base of other shapes")
        adapter = adapter.to(self.dtype)
        entry = _Entry(
            adapter_id=adapter_id,
            path=adapter.path,
            rank=adapter.max_rank,
            targets=tuple(sorted(adapter.projections)),
            size_bytes=adapter.num_bytes,
            pinned=pin,
        )
        with self._lock:
            self._check_new(adapter_id, pin)
            self._entries[adapter_id] = entry
            self._keep_tensors(entry, adapter)
            entry.last_used = next(self._clock)
            self._trim()

    def remove(self, adapter_id: str) -> None:
        """Unregister: new requests naming it get NotFound; requests holding it finish."""
        with self._lock:
            entry = self._entries.pop(adapter_id, None)
            if entry is None:
                raise NotFound(f"unknown adapter {adapter_id!r}")
            entry.registered = False
            if entry.adapter is not None:
                self._num_loaded -= 1
                if entry.users == 0:
                    self._by_uid.pop(entry.adapter.uid, None)

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(self._entries[key]) for key in sorted(self._entries)]

    def is_registered(self, adapter: LoraAdapter | None) -> bool:
        if adapter is None:
            return False
        with self._lock:
            entry = self._by_uid.get(adapter.uid)
            return entry is not None and entry.registered

    # ---- requests -----------------------------------------------------------------------------

    def check(self, refs: AdapterRefs) -> None:
        """InvalidRequest for malformed references, NotFound for an unknown id; cheap."""
        with self._lock:
            self._lookup(refs)

    def hold(self, refs: AdapterRefs, may_load: bool = True) -> AdapterUse | None:
        """The adapters of a request, held (never evicted) until `release`. Adapters on disk
        are read back when `may_load` (blocking: call it off the step thread); without it the
        answer is None when one is on disk, and nothing is held."""
        with self._lock:
            entries = self._lookup(refs)
            if not may_load and any(entry.adapter is None for entry, _ in entries):
                return None
            for entry, _ in entries:
                entry.users += 1
                entry.last_used = next(self._clock)
        try:
            for entry, _ in entries:
                if entry.adapter is None:
                    self._load_back(entry)
        except BaseException:
            with self._lock:
                self._unhold([entry for entry, _ in entries])
            raise
        return tuple((entry.adapter, weight) for entry, weight in entries)  # type: ignore[misc]

    def release(self, use: AdapterUse) -> None:
        """A request that held these adapters finished (never reads files)."""
        if not use:
            return
        with self._lock:
            held = (self._by_uid.get(adapter.uid) for adapter, _ in use)
            self._unhold([entry for entry in held if entry is not None])

    # ---- the step thread's slots ---------------------------------------------------------------

    def set_device(self, adapters: Sequence[LoraAdapter | None]) -> None:
        """The adapters now in the slots of the stacked copy."""
        with self._lock:
            self._device = frozenset(a.uid for a in adapters if a is not None)
            self._trim()

    def victim_key(self, adapter: LoraAdapter) -> tuple[int, int, int, int]:
        """Sort key of slot eviction, first out first: unloaded adapters, then idle before held,
        unpinned before pinned, least recently used first."""
        with self._lock:
            entry = self._by_uid.get(adapter.uid)
            if entry is None or not entry.registered:
                return (0, 0, 0, 0)
            return (1, int(entry.users > 0), int(entry.pinned), entry.last_used)

    # ---- internals (callers hold the lock) -------------------------------------------------------

    def _check_new(self, adapter_id: str, pin: bool) -> None:
        if not adapter_id:
            raise InvalidRequest("the adapter id is empty")
        if adapter_id in self._entries:
            raise AlreadyExists(f"adapter {adapter_id!r} is already loaded")
        if pin and sum(e.pinned for e in self._entries.values()) >= self.host_cache:
            raise ResourceExhausted(
                f"cannot pin adapter {adapter_id!r}: all {self.host_cache} places of the host "
                "cache are pinned"
            )

    def _lookup(self, refs: AdapterRefs) -> list[tuple[_Entry, float]]:
        seen: set[str] = set()
        found = []
        for item in refs:
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise InvalidRequest("adapters must be (adapter id, weight) pairs")
            adapter_id, weight = item
            if not isinstance(adapter_id, str):
                raise InvalidRequest(f"adapter ids are strings, not {adapter_id!r}")
            if not isinstance(weight, int | float) or not math.isfinite(weight):
                raise InvalidRequest(f"adapter {adapter_id!r} has weight {weight!r}; not finite")
            if adapter_id in seen:
                raise InvalidRequest(f"adapter {adapter_id!r} is named twice")
            seen.add(adapter_id)
            entry = self._entries.get(adapter_id)
            if entry is None:
                raise NotFound(f"unknown adapter {adapter_id!r}")
            found.append((entry, float(weight)))
        if len(found) > self.slots:
            raise InvalidRequest(
                f"the request names {len(found)} adapters; at most {self.slots} run at once "
                "(adapter slots)"
            )
        return found

    def _unhold(self, entries: list[_Entry]) -> None:
        for entry in entries:
            entry.users -= 1
            entry.last_used = next(self._clock)
            if entry.users == 0 and not entry.registered and entry.adapter is not None:
                self._by_uid.pop(entry.adapter.uid, None)
        self._trim()

    def _load_back(self, entry: _Entry) -> None:
        """Read an on-disk adapter's tensors again (outside the registry lock)."""
        with entry.load_lock:
            if entry.adapter is not None:  # another request read it meanwhile
                return
            adapter = load_adapter(entry.path, self.model_config, self.dtype)
            with self._lock:
                self._keep_tensors(entry, adapter)
                self._trim()

    def _keep_tensors(self, entry: _Entry, adapter: LoraAdapter) -> None:
        entry.adapter = adapter
        self._by_uid[adapter.uid] = entry
        if entry.registered:
            self._num_loaded += 1

    def _trim(self) -> None:
        """Evict least recently used idle, unpinned host copies that hold no slot, down to the
        cache size (or as far as such copies allow)."""
        excess = self._num_loaded - self.host_cache
        if excess <= 0:
            return
        idle = [
            entry
            for entry in self._entries.values()
            if entry.adapter is not None
            and entry.users == 0
            and not entry.pinned
            and entry.adapter.uid not in self._device
        ]
        for entry in sorted(idle, key=lambda e: e.last_used)[:excess]:
            del self._by_uid[entry.adapter.uid]  # type: ignore[union-attr]
            entry.adapter = None
            self._num_loaded -= 1

    def _info(self, entry: _Entry) -> AdapterInfo:
        if entry.adapter is None:
            state = AdapterState.ON_DISK
        elif entry.adapter.uid in self._device:
            state = AdapterState.DEVICE
        else:
            state = AdapterState.HOST
        return AdapterInfo(
            adapter_id=entry.adapter_id,
            path=entry.path,
            rank=entry.rank,
            target_modules=entry.targets,
            state=state,
            pinned=entry.pinned,
            size_bytes=entry.size_bytes,
            num_requests=entry.users,
        )
