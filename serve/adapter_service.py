"""AdapterService: the HTTP process's side of adapters — validate, publish to the store, register with
the engine, resolve `model` names to (adapter_id, version).

Every change is validated in full here first (archive safety, PEFT format, shapes against the base
model, finite weights) so that a bad upload is refused with nothing written, and the engine process
only ever re-reads files that are known to be good.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.archive import UploadLimits, extract_adapter_archive
from loraplex.adapters.errors import AdapterError, AdapterNotFoundError
from loraplex.adapters.kinds import adapter_traits, load_served_adapter
from loraplex.adapters.mixlora import MixLoRAWeights, convert_legacy, write_mixlora
from loraplex.adapters.peft import LORA_MODULES, _read_state_dict
from loraplex.adapters.runtime import check_limits
from loraplex.adapters.store import (
    AdapterStore,
    AdapterVersion,
    validate_adapter_name,
    validate_metadata,
)

logger = logging.getLogger("loraplex.serve")
PINNED_RE = re.compile(r"(.+)@v?([0-9]{1,9})")  # `model: "name@3"`: version 3 of adapter `name`

FOLLOW_POLL_S = 1.0  # the change log is read at least this often (PostgreSQL's NOTIFY wakes it at once)


class AdapterConflictError(AdapterError):
    status_code = 409
    code = "adapter_exists"


@dataclass(frozen=True, slots=True)
class AdapterSettings:
    adapter_dir: Path  # upload staging, and the store's SQLite file, folders and cache unless set below
    max_lora_rank: int = 64
    max_adapters_per_request: int = 8  # --max-adapters-per-request: the length of a request's `adapters`
    upload_limits: UploadLimits = UploadLimits()
    database: str | None = None  # --database: sqlite:///... or postgresql://... (default: under adapter_dir)
    blob_store: str | None = None  # --blob-store: file:///... or s3://bucket/prefix (default: adapter_dir)


class AdapterService:
    def __init__(self, engine: Any, settings: AdapterSettings, base_model_names: list[str]) -> None:
        self.engine = engine  # AsyncEngine: .call(method, *args), .model_config
        self.settings = settings
        self.base_model_names = set(base_model_names)
        (settings.adapter_dir / "tmp").mkdir(parents=True, exist_ok=True)  # upload staging
        self.store = AdapterStore(settings.adapter_dir, database=settings.database, blobs=settings.blob_store)
        self.served: dict[str, AdapterVersion] = {}  # name -> the version new requests get
        self._lock = asyncio.Lock()  # one publish/unload at a time: versions stay ordered
        # which versions the engine has (a remote store's are pulled on their first request), and the store's
        # change log followed: what other servers publish and delete reaches this one
        self.registered: set[tuple[int, int]] = set()
        self.versions: dict[tuple[int, int], AdapterVersion] = {}  # what each registered key is (rank, type)
        self.full_modules: set[tuple[int, int]] = set()  # registered keys with their own embed_tokens / lm_head
        self._pulling: dict[tuple[int, int], asyncio.Future] = {}
        self._limits: dict[str, int] | None = None  # the engine's pool size and MixLoRA limits, asked once
        self._cursor = 0
        self._follower: asyncio.Task | None = None
        self._pull_on_miss = self.store.blobs.local_path("adapters") is None

    # ---- start-up ---------------------------------------------------------------------------
    async def start(self, lora_modules: dict[str, str] | None = None) -> None:
        """Serve every adapter already in the store (a remote store's on their first request), publish
        `--lora-modules` folders, then follow the store's change log."""
        self._cursor = await asyncio.to_thread(self.store.last_change)  # before the listing: nothing missed
        for version in await asyncio.to_thread(self.store.list):
            self.served[version.name] = version
            if self._pull_on_miss:
                continue
            try:
                await self._register(version)
            except AdapterError as e:
                self.served.pop(version.name, None)
                logger.error("adapter %s v%d in the store is not servable: %s", version.name, version.version, e)
        for name, path in (lora_modules or {}).items():
            await self.publish_folder(name, Path(path), allow_bin=True, replace=True, skip_if_same=True)
        if self.served:
            logger.info("serving %d adapter(s): %s", len(self.served), ", ".join(sorted(self.served)))
        self._follower = asyncio.get_running_loop().create_task(self._follow(), name="adapter-store-follower")

    async def stop_following(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            try:
                await self._follower
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping
                pass
            self._follower = None

    def close(self) -> None:
        self.store.close()

    # ---- following other servers ------------------------------------------------------------
    async def _follow(self) -> None:
        """Apply the store's change log as it grows: woken by PostgreSQL's NOTIFY at once, polled every
        FOLLOW_POLL_S otherwise (SQLite, or a lost notification connection)."""
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        listener = self.store.listen(lambda: loop.call_soon_threadsafe(wake.set))
        try:
            while True:
                try:
                    await asyncio.wait_for(wake.wait(), timeout=FOLLOW_POLL_S)
                except asyncio.TimeoutError:
                    pass
                wake.clear()
                try:
                    await self.sync()
                except Exception as e:  # noqa: BLE001 - the database away for a while: try again next time
                    logger.warning("following the adapter store: %s", e)
        finally:
            if listener is not None:
                listener.stop()

    async def sync(self) -> int:
        """Apply the change log since the last call: a newer version of a name becomes the one new requests
        get; a deleted name stops being served (its running requests finish). -> changes applied."""
        changes = await asyncio.to_thread(self.store.changes, self._cursor)
        for change in changes:
            self._cursor = change.seq
            if change.kind == "delete":
                current = self.served.get(change.name)
                if current is not None and current.adapter_id == change.adapter_id:
                    async with self._lock:
                        self.served.pop(change.name, None)
                        await self._unregister(change.adapter_id)
                    logger.info("adapter %s was deleted (by another server)", change.name)
                continue
            current = self.served.get(change.name)
            if current is not None and (current.adapter_id, current.version) >= (change.adapter_id, change.version):
                continue  # this server's own publish, or older news
            try:
                version = await asyncio.to_thread(self.store.get_version, change.name, change.version)
            except AdapterNotFoundError:
                continue  # deleted since: a later change says so
            self.served[change.name] = version
            logger.info("adapter %s v%d was published (by another server)", version.name, version.version)
            if not self._pull_on_miss:
                try:
                    await self._register(version)
                except AdapterError as e:
                    logger.error("adapter %s v%d is not servable: %s", version.name, version.version, e)
        return len(changes)

    # ---- lookups ----------------------------------------------------------------------------
    async def resolve(self, name: str) -> tuple[int, int] | None:
        """(adapter_id, version) new requests for `name` get, registered with the engine first when this
        server has not served that version yet (pulled from the store on a miss); None: no such adapter.
        `name@N` (or `name@vN`) pins version N of `name`, however many versions came after it."""
        pinned = PINNED_RE.fullmatch(name)
        if pinned is not None:
            return await self._resolve_pinned(pinned[1], int(pinned[2]))
        version = self.served.get(name)
        if version is None and self._pull_on_miss:
            try:  # maybe published elsewhere a moment ago, before the change log reached this server
                version = await asyncio.to_thread(self.store.latest, name)
            except AdapterNotFoundError:
                return None
            self.served[name] = version
        if version is None:
            return None
        key = (version.adapter_id, version.version)
        if key not in self.registered:
            await self._pull(version)
        return key

    async def _resolve_pinned(self, name: str, number: int) -> tuple[int, int] | None:
        if name not in self.served and not self._pull_on_miss:
            return None
        try:
            version = await asyncio.to_thread(self.store.get_version, name, number)
        except AdapterNotFoundError:
            return None
        key = (version.adapter_id, version.version)
        if key not in self.registered:
            await self._pull(version)
        return key

    async def _pull(self, version: AdapterVersion) -> None:
        """Register `version` once, however many requests miss on it at the same time."""
        key = (version.adapter_id, version.version)
        pending = self._pulling.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._pulling[key] = pending
            try:
                await self._register(version)
                pending.set_result(None)
            except BaseException as e:
                pending.set_exception(e)
                pending.exception()  # retrieved here: the waiters below re-raise it
                raise
            finally:
                self._pulling.pop(key, None)
        else:
            await asyncio.shield(pending)

    def names(self) -> list[str]:
        return sorted(self.served)

    async def describe(self, name: str) -> dict[str, Any]:
        if name not in self.served:
            raise AdapterNotFoundError(name)
        state = await self.engine.call("adapter_state")
        versions = []
        for v in await asyncio.to_thread(self.store.versions, name):
            resident = state.get(f"{v.adapter_id}:{v.version}")
            versions.append({"version": v.version, "type": v.adapter_type, "rank": v.rank, "lora_alpha": v.alpha,
                             "target_modules": list(v.target_modules), "bytes": v.num_bytes,
                             "sha256": v.sha256, "created": int(v.created),
                             "resident": resident["tier"] if resident else "store",
                             "running_requests": resident["running"] if resident else 0})
        latest = self.served[name]
        return {"id": name, "object": "adapter", "adapter_id": latest.adapter_id, "version": latest.version,
                "type": latest.adapter_type, "rank": latest.rank, "target_modules": list(latest.target_modules), "bytes": latest.num_bytes,
                "created": int(latest.created), "versions": versions,
                "metadata": await asyncio.to_thread(self.store.metadata, name)}

    async def summaries(self) -> list[dict[str, Any]]:
        """Every served adapter's summary with where its newest version's weights are now (`resident`: device,
        host or store; one engine call for all)."""
        try:
            state = await self.engine.call("adapter_state")
        except Exception:  # noqa: BLE001 - an engine without the adapter hook's state (a cluster): no residency
            state = {}
        metadata = await asyncio.to_thread(self.store.all_metadata)
        out = []
        for name in self.names():
            summary = self.summary(name)
            resident = state.get(f"{summary['adapter_id']}:{summary['version']}")
            out.append({**summary, "resident": resident["tier"] if resident else "store",
                        "metadata": metadata.get(name, {})})
        return out

    def summary(self, name: str) -> dict[str, Any]:
        v = self.served[name]
        return {"id": name, "object": "adapter", "adapter_id": v.adapter_id, "version": v.version,
                "type": v.adapter_type, "rank": v.rank, "target_modules": list(v.target_modules), "bytes": v.num_bytes,
                "created": int(v.created)}

    async def archive(self, name: str, version: int | None = None) -> Path:
        """A temporary .tar.gz of `name`'s version (newest when None): the caller deletes it."""
        if name not in self.served:
            raise AdapterNotFoundError(name)
        record = self.served[name] if version is None else await asyncio.to_thread(self.store.get_version, name,
                                                                                   version)
        fd, tmp = tempfile.mkstemp(prefix="download-", suffix=".tar.gz", dir=self.settings.adapter_dir / "tmp")
        os.close(fd)

        def pack() -> None:
            folder = self.store.fetch(record)
            with tarfile.open(tmp, "w:gz") as tar:
                for file_name in ("adapter_config.json", "adapter_model.safetensors"):
                    tar.add(folder / file_name, arcname=file_name)
        try:
            await asyncio.to_thread(pack)
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp)

    # ---- changes ----------------------------------------------------------------------------
    async def upload(self, name: str, archive: Path, metadata: dict | None = None) -> AdapterVersion:
        """Publish an uploaded archive (zip or tar.gz of a PEFT folder) as `name`'s next version, with its
        metadata (description, example prompts) when given."""
        self._check_name(name)
        if metadata is not None:
            metadata = validate_metadata(metadata)  # before any work: a bad field changes nothing
        with tempfile.TemporaryDirectory(prefix="upload-", dir=self.settings.adapter_dir / "tmp") as tmp:
            folder = await asyncio.to_thread(extract_adapter_archive, archive, Path(tmp),
                                             self.settings.upload_limits)
            return await self.publish_folder(name, folder, allow_bin=False, replace=True, metadata=metadata)

    async def update_metadata(self, name: str, changes: dict) -> dict:
        if name not in self.served and not self._pull_on_miss:
            raise AdapterNotFoundError(name)
        return await asyncio.to_thread(self.store.set_metadata, name, changes)

    async def publish_folder(self, name: str, folder: Path, *, allow_bin: bool, replace: bool,
                             skip_if_same: bool = False, metadata: dict | None = None) -> AdapterVersion:
        """Validate `folder` against the base model and publish it. `replace=False` refuses an existing
        name (vLLM's load_lora_adapter without load_inplace)."""
        self._check_name(name)
        if not folder.is_dir():
            raise AdapterError(f"adapter path {str(folder)!r} is not a directory on the server", param="lora_path")
        async with self._lock:
            if name in self.served and not replace:
                raise AdapterConflictError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            weights = await asyncio.to_thread(load_served_adapter, folder, self.engine.model_config,
                                              self.settings.max_lora_rank, allow_bin=allow_bin)
            check_limits(weights, await self.engine_limits())  # what the engine could never load is a 400 now
            with tempfile.TemporaryDirectory(prefix="stage-", dir=self.settings.adapter_dir / "tmp") as stage:
                src = await asyncio.to_thread(_as_safetensors_folder, folder, weights, Path(stage))
                if skip_if_same and name in self.served and _sha256(src) == self.served[name].sha256:
                    return self.served[name]
                version = await asyncio.to_thread(
                    self.store.publish, name, src, rank=weights.rank, alpha=weights.config.lora_alpha,
                    target_modules=weights.target_modules, metadata=metadata,
                    adapter_type=weights.kind)
            try:
                await self._register(version)
            except BaseException:
                logger.exception("engine refused adapter %s v%d", name, version.version)
                raise
            logger.info("published adapter %s v%d (rank %d, %s, %d bytes)", name, version.version, version.rank,
                        ",".join(version.target_modules), version.num_bytes)
            return version

    async def remove(self, name: str) -> list[AdapterVersion]:
        """Stop serving `name` and delete it from the store; running requests finish on it first."""
        async with self._lock:
            if name not in self.served:
                raise AdapterNotFoundError(name)
            version = self.served.pop(name)
            removed = await asyncio.to_thread(self.store.delete, name)
            await self._unregister(version.adapter_id)
            logger.info("removed adapter %s (%d version(s))", name, len(removed))
            return removed

    async def _register(self, version: AdapterVersion) -> None:
        # the engine reads the files from this local folder whenever the version is (re)loaded: pinned in the
        # store's cache (a remote blob store) for as long as it is served
        t0 = time.perf_counter()
        pulls = getattr(self.engine, "pulls_adapters", False)  # the cluster's replicas fetch the files themselves
        folder = "" if pulls else await asyncio.to_thread(self.store.fetch, version, pin=True)
        await self.engine.call("register_adapter", version.name, version.adapter_id, version.version, str(folder))
        # as the engine does: a version retires the older ones of its adapter (a pinned request registers
        # an older one again)
        self.registered = {k for k in self.registered if k[0] != version.adapter_id or k[1] >= version.version}
        self.registered.add((version.adapter_id, version.version))
        self.versions = {k: v for k, v in self.versions.items() if k in self.registered}
        self.versions[version.adapter_id, version.version] = version
        self.full_modules &= self.registered
        if folder and adapter_traits(folder)[1]:
            self.full_modules.add((version.adapter_id, version.version))
        current = self.served.get(version.name)
        if current is None or (current.adapter_id, current.version) <= (version.adapter_id, version.version):
            self.served[version.name] = version
        if self._pull_on_miss and not pulls:
            logger.info("adapter %s v%d pulled from %s and registered in %.0f ms", version.name, version.version,
                        self.store.blobs.url, 1000 * (time.perf_counter() - t0))

    async def _unregister(self, adapter_id: int) -> None:
        await self.engine.call("unregister_adapter", adapter_id)
        self.registered = {k for k in self.registered if k[0] != adapter_id}
        self.versions = {k: v for k, v in self.versions.items() if k in self.registered}

    async def engine_limits(self) -> dict[str, int]:
        """The engine's pool pages, --max-lora-rank and MixLoRA limits (asked once)."""
        if self._limits is None:
            self._limits = await self.engine.call("limits")
        return self._limits

    def _check_name(self, name: str) -> None:
        validate_adapter_name(name)
        if name in self.base_model_names:
            raise AdapterConflictError(f"{name!r} is the base model's name; choose another adapter name",
                                       param="name")


def _as_safetensors_folder(folder: Path, weights, stage: Path) -> Path:
    """The folder to publish: a LoRA as given when it already has adapter_model.safetensors (a legacy .bin
    adapter, local paths only, is converted so the store only ever holds safetensors); a MixLoRA rewritten."""
    if isinstance(weights, MixLoRAWeights):  # stored in today's names and safetensors (MoE-PEFT writes a .bin,
        # older adapters the legacy layout), the config as MoE-PEFT exports it: byte-identical for equal input
        return write_mixlora(stage, weights.config, convert_legacy(_read_state_dict(folder, allow_bin=True)))
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    from safetensors.torch import save_file
    shutil.copy(folder / "adapter_config.json", stage / "adapter_config.json")
    state = {}
    for (layer, module), (a, b) in weights.tensors.items():
        parent = LORA_MODULES[module]
        prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
        name = f"model.layers.{layer}.{parent}.{module}"
        state[f"{prefix}.lora_A.weight"] = a.float().contiguous()
        state[f"{prefix}.lora_B.weight"] = (b.float() / weights.config.scale_of(name)).contiguous()
        if weights.magnitudes is not None:
            state[f"{prefix}.lora_magnitude_vector"] = weights.magnitudes[layer, module]
    save_file(state, str(stage / "adapter_model.safetensors"))
    return stage


def _sha256(folder: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(folder / "adapter_model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
