"""FineTuningService: the HTTP process's side of OpenAI fine-tuning — files, jobs, cancel, and publishing
what the engine side trained.

Training runs in the engine process (trainer/service.py), which shares the JobStore on disk and is driven by
two control calls: `train_submit` and `train_cancel`. When it has written a job's final PEFT folder it records
it with `JobStore.set_output`; the publish loop here turns that into an adapter named
`ft:{base}:{suffix}:{job_id}` (AdapterService.publish_folder: validated, stored, hot-loaded) and marks the
job succeeded.

Validation happens before anything is written (Invariant 1): an upload that does not parse is refused with the
parser's line-numbered message and not stored; a job whose files fail validation at creation gets 400 and no
job is created (as OpenAI answers a bad file). Files are validated at upload already, so that second check is
a guard; the job row itself checks its files exist in the same transaction that creates it, and an unfinished
job's files cannot be deleted.
"""
from __future__ import annotations

import asyncio
import csv
import io
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.engine.core.errors import EngineDeadError
from loraplex.serve.errors import (
    ConflictError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    RequestTooLargeError,
    ServiceUnavailableError,
)
from loraplex.serve.schemas import CreateFineTuningJobRequest
from loraplex.trainer.data import TEMPLATES, DataError, parse_examples
from loraplex.trainer.job_store import (
    RESULT_COLUMNS,
    RESULTS_PURPOSE,
    FileRecord,
    InvalidTransitionError,
    JobRecord,
    JobStore,
    fine_tuned_model_name,
    process_owner_id,
)

logger = logging.getLogger("loraplex.serve")

FINE_TUNE_PURPOSE = "fine-tune"
MAX_FILENAME_CHARS = 255
PUBLISH_INTERVAL_S = 0.5
PUBLISH_CLAIM_S = 120.0  # a server that died while publishing: another publishes the job after this
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
CHECKPOINT_MODEL = re.compile(r"(?P<model>ft:.+):ckpt-step-(?P<step>[0-9]{1,9})")


@dataclass(frozen=True, slots=True)
class FineTuningSettings:
    fine_tuning_dir: Path
    max_file_bytes: int = 64 << 20
    database: str | None = None  # --database (default: SQLite in fine_tuning_dir)
    blob_store: str | None = None  # --blob-store (default: fine_tuning_dir)


def sanitize_filename(name: str | None) -> str:
    """The client's file name as metadata only (files are stored by id): basename, no control characters,
    at most MAX_FILENAME_CHARS (the extension kept)."""
    base = _CONTROL_CHARS.sub("", re.split(r"[/\\]", name or "")[-1]).strip()
    if base in ("", ".", ".."):
        return "upload.jsonl"
    if len(base) > MAX_FILENAME_CHARS:
        stem, dot, ext = base.rpartition(".")
        ext = ext[:16] if dot and stem else ""
        base = base[:MAX_FILENAME_CHARS - len(ext) - 1] + "." + ext if ext else base[:MAX_FILENAME_CHARS]
    return base


class FineTuningService:
    def __init__(self, engine: Any, adapters: Any, settings: FineTuningSettings,
                 base_model_names: list[str]) -> None:
        self.engine = engine  # AsyncEngine: .call(method, *args), .max_model_len
        self.adapters = adapters  # AdapterService: .publish_folder(name, folder, allow_bin=, replace=)
        self.settings = settings
        self.base_model_names = list(base_model_names)
        self.store = JobStore(settings.fine_tuning_dir, database=settings.database, blobs=settings.blob_store)
        self.owner = process_owner_id(self.store.root)  # its claims on publishing (several servers may share a store)
        self._publisher: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start publishing finished jobs; the engine side resumes unfinished ones by itself."""
        self._publisher = asyncio.get_running_loop().create_task(self._publish_loop(), name="fine-tuning-publish")

    async def close(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            try:
                await self._publisher
            except asyncio.CancelledError:
                pass
            self._publisher = None
        self.store.close()

    # ---- files ----------------------------------------------------------------------------------
    async def add_file(self, data: bytes, filename: str | None, purpose: str) -> FileRecord:
        if purpose != FINE_TUNE_PURPOSE:
            raise InvalidRequestError(f"purpose must be {FINE_TUNE_PURPOSE!r} (this server stores training files "
                                      f"only); got {purpose!r}", param="purpose")
        if len(data) > self.settings.max_file_bytes:
            raise_too_large(self.settings.max_file_bytes)
        try:
            await asyncio.to_thread(parse_examples, data, "auto")
        except DataError as e:
            raise InvalidRequestError(f"Invalid training file: {e}", param="file", code="invalid_file") from None
        return await asyncio.to_thread(self.store.add_file, data, sanitize_filename(filename), purpose)

    async def list_files(self, purpose: str | None = None) -> list[FileRecord]:
        return await asyncio.to_thread(self.store.list_files, purpose)

    async def get_file(self, file_id: str) -> FileRecord:
        record = await asyncio.to_thread(self.store.get_file, file_id)
        if record is None:
            raise NotFoundError(f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return record

    async def file_path(self, file_id: str) -> Path:
        return self.store.file_path((await self.get_file(file_id)).id)

    async def delete_file(self, file_id: str) -> None:
        if not await asyncio.to_thread(self.store.delete_file, file_id):  # FileInUseError -> 409
            raise NotFoundError(f"No such File object: {file_id}", param="file_id", code="file_not_found")

    # ---- jobs -----------------------------------------------------------------------------------
    async def create_job(self, req: CreateFineTuningJobRequest) -> JobRecord:
        if req.model not in self.base_model_names:
            raise ModelNotFoundError(req.model)
        method = req.method_type
        for param in ("training_file", "validation_file"):
            file_id = getattr(req, param)
            if file_id is not None:
                await self._check_file(file_id, param, method)
        lora = await self._lora(req)
        if method == "dpo" and lora.get("self_distillation"):
            raise InvalidRequestError("lora.self_distillation applies to supervised fine-tuning only (DPO holds the "
                                      "adapter to the base model through its reference)", param="lora.self_distillation")
        if method == "dpo" and lora.get("packing"):
            raise InvalidRequestError("lora.packing does not apply to DPO", param="lora.packing")
        # "auto" stays "auto" until the engine side has read the data and resolved it (trainer/defaults.py)
        hyperparameters = req.given_hyperparameters().model_dump()
        job = await asyncio.to_thread(
            self.store.create_job, model=req.model, training_file=req.training_file,
            validation_file=req.validation_file, suffix=req.suffix,
            seed=random.randrange(1 << 31) if req.seed is None else req.seed, hyperparameters=hyperparameters,
            lora=lora, method={"type": method, method: {"hyperparameters": hyperparameters}},
            metadata=req.metadata, priority=req.priority)
        await self._event(job.id, "info", f"Created fine-tuning job: {job.id}")
        await self._event(job.id, "info", "Files validated, moving job to queued state")
        job = await asyncio.to_thread(self.store.set_status, job.id, "queued")
        try:
            await self.engine.call("train_submit", job.id)
        except Exception as e:  # noqa: BLE001 - the job cannot run: say so on the job and to the client
            logger.error("train_submit %s failed: %s", job.id, e)
            message = f"The training engine did not accept the job: {e}"
            await self._fail(job.id, "engine_error", message)
            raise ServiceUnavailableError(message, code="training_unavailable") from None
        logger.info("fine-tuning job %s queued (model %s, file %s)", job.id, job.model, job.training_file)
        return await self.get_job(job.id)

    async def _check_file(self, file_id: str, param: str, method: str = "supervised") -> None:
        record = await asyncio.to_thread(self.store.get_file, file_id)
        if record is None:
            raise NotFoundError(f"No such File object: {file_id}", param=param, code="file_not_found")
        if record.purpose != FINE_TUNE_PURPOSE:
            raise InvalidRequestError(f"File {file_id} has purpose {record.purpose!r}; fine-tuning needs a file "
                                      f"uploaded with purpose {FINE_TUNE_PURPOSE!r}", param=param)
        data = await asyncio.to_thread(self.store.read_file, file_id)
        try:
            examples = await asyncio.to_thread(parse_examples, data, "auto")
        except DataError as e:
            raise InvalidRequestError(f"Invalid {param} {file_id}: {e}", param=param,
                                      code=f"invalid_{param}") from None
        is_preference = examples[0].kind == "preference"
        if (method == "dpo") != is_preference:
            need = ("preference data (JSON lines with input, preferred_output and non_preferred_output)"
                    if method == "dpo" else "chat, prompt/completion, Alpaca or text data")
            raise InvalidRequestError(f"Invalid {param} {file_id}: the {method} method needs {need}", param=param,
                                      code=f"invalid_{param}")

    async def _lora(self, req: CreateFineTuningJobRequest) -> dict[str, Any]:
        """The job's `lora` column: LoRASpec's fields resolved (LoRASpec validates them) plus given extras."""
        from loraplex.trainer.lora_layers import (  # torch: only when a job is created
            MixLoRASpec,
            make_spec,
            spec_field_names,
        )
        given = req.lora.model_dump(exclude_none=True) if req.lora is not None else {}
        try:
            spec_names = spec_field_names(given)
            spec = make_spec(given)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"lora: {e}", param="lora") from None
        max_rank = getattr(getattr(self.adapters, "settings", None), "max_lora_rank", None)
        ranks = [spec.r] + ([spec.expert_rank] if isinstance(spec, MixLoRASpec) else [])
        if max_rank is not None and max(ranks) > max_rank:
            raise InvalidRequestError(f"lora.r must be at most the server's --max-lora-rank ({max_rank}) so the "
                                      f"fine-tuned model can be served; got {max(ranks)}", param="lora.r")
        if isinstance(spec, MixLoRASpec):
            limits = await self.adapters.engine_limits()
            if spec.num_experts > limits.get("max_mixlora_experts", spec.num_experts):
                raise InvalidRequestError(f"lora.num_experts must be at most the server's --max-mixlora-experts "
                                          f"({limits['max_mixlora_experts']}) so the fine-tuned model can be served",
                                          param="lora.num_experts")
        extras = {k: v for k, v in given.items() if k not in [*spec_names, "type", "expert_lora"]}
        if "template" in extras and extras["template"] not in TEMPLATES:
            raise InvalidRequestError(f"lora.template must be one of {', '.join(TEMPLATES)}; "
                                      f"got {extras['template']!r}", param="lora.template")
        max_model_len = getattr(self.engine, "max_model_len", None)
        if "max_length" in extras and max_model_len is not None and extras["max_length"] > max_model_len:
            raise InvalidRequestError(f"lora.max_length must be at most the server's max_model_len "
                                      f"({max_model_len}); got {extras['max_length']}", param="lora.max_length")
        resolved = {f: getattr(spec, f) for f in spec_names}
        resolved["target_modules"] = list(spec.target_modules)
        if isinstance(spec, MixLoRASpec):
            resolved["type"] = "mixlora"
        return {**resolved, **extras}

    async def get_job(self, job_id: str) -> JobRecord:
        job = await asyncio.to_thread(self.store.get_job, job_id)
        if job is None:
            raise NotFoundError(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id",
                                code="fine_tuning_job_not_found")
        return job

    async def list_jobs(self, after: str | None, limit: int,
                        metadata: dict[str, str] | None = None) -> tuple[list[JobRecord], bool]:
        return await asyncio.to_thread(self.store.list_jobs, after, limit, metadata)

    async def list_events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        await self.get_job(job_id)
        return await asyncio.to_thread(self.store.list_events, job_id, after, limit)

    async def list_checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        await self.get_job(job_id)
        return await asyncio.to_thread(self.store.list_checkpoints, job_id, after, limit)

    async def cancel(self, job_id: str) -> JobRecord:
        job = await self.get_job(job_id)
        if job.is_finished:
            raise ConflictError(f"Fine-tuning job {job_id} has already {job.status}; only a job that has not "
                                "finished can be cancelled", param="fine_tuning_job_id", code="job_not_cancellable")
        try:
            await self.engine.call("train_cancel", job_id)
        except Exception as e:  # noqa: BLE001 - the store is the record: the job is cancelled here regardless
            logger.warning("train_cancel %s failed (%s); cancelling it in the store only", job_id, e)
        job = await self.get_job(job_id)  # the engine side may have cancelled it already
        if not job.is_finished:
            try:
                job = await asyncio.to_thread(self.store.set_status, job_id, "cancelled")
                await self._event(job_id, "info", "The job was cancelled")
            except InvalidTransitionError:  # it finished meanwhile: report what it became
                job = await self.get_job(job_id)
        return job

    async def pause(self, job_id: str) -> JobRecord:
        job = await self.get_job(job_id)
        if job.status not in ("queued", "running"):
            raise InvalidRequestError(f"Fine-tuning job {job_id} is {job.status}; only a queued or running job can "
                                      "be paused", param="fine_tuning_job_id", code="job_not_pausable")
        if job.output_path:
            raise InvalidRequestError(f"Fine-tuning job {job_id} has finished training and is being published",
                                      param="fine_tuning_job_id", code="job_not_pausable")
        await self._control("train_pause", job_id)
        return await self.get_job(job_id)

    async def resume(self, job_id: str) -> JobRecord:
        job = await self.get_job(job_id)
        if job.status != "paused":
            raise InvalidRequestError(f"Fine-tuning job {job_id} is {job.status}; only a paused job can be resumed",
                                      param="fine_tuning_job_id", code="job_not_paused")
        await self._control("train_resume", job_id)
        return await self.get_job(job_id)

    async def _control(self, method: str, job_id: str) -> None:
        try:
            await self.engine.call(method, job_id)
        except ValueError as e:  # the job changed state meanwhile
            raise InvalidRequestError(str(e), param="fine_tuning_job_id") from None
        except Exception as e:  # noqa: BLE001 - the engine is gone or busy: say so
            raise ServiceUnavailableError(f"The training engine did not take the call: {e}",
                                          code="training_unavailable") from None

    # ---- checkpoints as models ------------------------------------------------------------------
    async def checkpoint_adapter(self, name: str) -> tuple[int, int] | None:
        """`ft:...:ckpt-step-N` as a model: its checkpoint's adapter, published under that name on first use
        (later uses find it served). None when `name` is no checkpoint of a job here."""
        match = CHECKPOINT_MODEL.fullmatch(name)
        if match is None or self.adapters is None:
            return None
        job_id = match["model"].rsplit(":", 1)[-1]
        job = await asyncio.to_thread(self.store.get_job, job_id)
        if job is None:
            return None
        checkpoint = await asyncio.to_thread(self.store.checkpoint_at, job_id, int(match["step"]))
        if checkpoint is None or checkpoint["fine_tuned_model_checkpoint"] != name:
            return None
        folder = await asyncio.to_thread(self.store.local_folder, checkpoint["path"])
        await self.adapters.publish_folder(name, folder, allow_bin=False, replace=True,
                                           skip_if_same=True)
        logger.info("checkpoint %s of fine-tuning job %s is served as %s", checkpoint["id"], job_id, name)
        return await self.adapters.resolve(name)

    # ---- publishing -----------------------------------------------------------------------------
    async def publish_pending(self) -> int:
        """Publish every job the engine side has finished training; returns how many succeeded."""
        published = 0
        for job in await asyncio.to_thread(self.store.jobs_awaiting_publish):
            name = fine_tuned_model_name(job.model, job.suffix, job.id)
            if not await asyncio.to_thread(self.store.claim_publish, job.id, self.owner, PUBLISH_CLAIM_S):
                continue  # another server is publishing it
            try:
                if self.adapters is None:
                    raise ValueError("this server runs without LoRA support, so it cannot serve the adapter")
                folder = await asyncio.to_thread(self.store.local_folder, job.output_path)
                await self.adapters.publish_folder(name, folder, allow_bin=False, replace=True)
            except EngineDeadError:
                raise  # not the job's fault: it stays trained and is published by the next server
            except Exception as e:  # noqa: BLE001 - a bad adapter folder, a full disk: the job fails, not the loop
                logger.error("publishing fine-tuning job %s as %s failed: %s", job.id, name, e)
                await self._fail(job.id, "publish_failed", f"The trained adapter could not be published: {e}")
                continue
            try:
                await asyncio.to_thread(self._write_result_file, job)
                await asyncio.to_thread(self.store.set_status, job.id, "succeeded", fine_tuned_model=name,
                                        trained_tokens=job.trained_tokens)
            except InvalidTransitionError:  # cancelled while publishing; the adapter stays published
                logger.warning("fine-tuning job %s was cancelled while %s was being published", job.id, name)
                continue
            await self._event(job.id, "info", f"New fine-tuned model created: {name}")
            await self._event(job.id, "info", "The job has successfully completed")
            logger.info("fine-tuning job %s succeeded: published %s", job.id, name)
            published += 1
        return published

    async def _publish_loop(self) -> None:
        while True:
            try:
                await self.publish_pending()
            except EngineDeadError as e:
                logger.error("fine-tuning publish loop stops: %s", e)
                return
            except Exception:  # noqa: BLE001 - e.g. the database busy past its timeout: try again next tick
                logger.exception("fine-tuning publish loop")
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    def _write_result_file(self, job: JobRecord) -> None:
        """OpenAI's result file: the per-step metrics as CSV (RESULT_COLUMNS, then any extra metric the method
        reports, e.g. DPO's margins), stored as a file of purpose fine-tune-results."""
        rows = self.store.metric_rows(job.id)
        columns = list(RESULT_COLUMNS) + sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
        record = self.store.add_file(out.getvalue().encode(), "step_metrics.csv", RESULTS_PURPOSE)
        self.store.set_result_files(job.id, [record.id])

    # ---- helpers --------------------------------------------------------------------------------
    async def _event(self, job_id: str, level: str, message: str) -> None:
        await asyncio.to_thread(self.store.add_event, job_id, level, message)

    async def _fail(self, job_id: str, code: str, message: str) -> None:
        try:
            await asyncio.to_thread(self.store.set_status, job_id, "failed",
                                    error={"code": code, "message": message, "param": None})
        except InvalidTransitionError:
            return  # it ended otherwise meanwhile (e.g. cancelled)
        await self._event(job_id, "error", message)


def raise_too_large(max_bytes: int) -> None:
    raise RequestTooLargeError(f"The file is larger than the {format_bytes(max_bytes)} limit", param="file",
                               code="file_too_large")


def format_bytes(num_bytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if num_bytes >= 1 << shift:
            return f"{num_bytes / (1 << shift):g} {unit}"
    return f"{num_bytes} bytes"
