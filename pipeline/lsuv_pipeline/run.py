"""``compute``: one writer, a new store or the one to resume or find up to date, the loop.

::

    options -> device, sources, model, executor               (context.py)
    lock the store; open it: up to date? resume? another run? (store.py, schema.py)
    trace the model, plan its layers; create the store or check the one resumed
    the layer loop, then verification                         (lsuv.py)
    final weights, status "complete"; OffTarget if a layer misses the tolerance

A finished store with the same config, data and model is up to date: a rerun does no
pass. A run killed at any moment resumes from its store to the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import batches as B
from .attention import get_layer
from .batches import ForwardFn, MaskFn
from .cache import Segments, Uncacheable, parse_size
from .checkpoint import check_fits, load_init, run_stats
from .config import RunConfig, with_default_tol
from .context import (
    keeps_callers_rng,
    model_for,
    open_executor,
    open_sources,
    recorded_config,
    resolve_device,
)
from .data import Source, resolve_root
from .data.loading import default_workers
from .errors import ConfigError, Interrupted, OffTarget, ReadOnlyStore, StoreError
from .executors import Executor
from .hooks import model_dtype
from .layers import LayerPlan, plan_layers, trace
from .lock import LOCK_NAME, writer_lock
from .lsuv import LayerLoop, Setup, off_target
from .models import assign_state_
from .numerics import check_resume, numerics_key, with_mixed
from .passes import PassContext, stop_on_sigint
from .progress import Progress, as_progress
from .ranks import RankExecutor, Ranks, agree, current, pack, raise_from, unpack
from .report import LayerStats, format_table, with_unsolved
from .schema import differences, identity, root_attrs, stored_identity
from .solve import orthogonal_, refresh_weight_norm_
from .store import RunStore
from .zarrio import scratch_folder

__all__ = ["RunResult", "compute"]


@dataclass
class RunResult:
    """What :func:`compute` did.

    Attributes:
        path: The run store.
        model: The model, now initialized.
        config: The configuration it ran.
        layers: Per-layer statistics, in forward order, the layers left as they are (with
            their reason) included.
        passes: Passes over the solve split this call ran, verification excluded.
        seconds: Wall time of this call's solve (passes and writes), verification excluded.
        up_to_date: The store was already complete for this config and data.
        resumed: The store held an unfinished run that this call continued.
        off_target: Solved layers whose verified statistics miss ``config.tol`` on the
            solve split (``compute`` raises :class:`~.errors.OffTarget` when any do).
        compile_seconds: Time this call spent compiling its kernel (``config.compile``),
            before the solve and not in ``seconds``.
    """

    path: Path
    model: nn.Module
    config: RunConfig
    layers: list[LayerStats] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0
    up_to_date: bool = False
    resumed: bool = False
    off_target: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0

    @property
    def solved(self) -> list[LayerStats]:
        """The layers the run solved (``layers`` without those it left)."""
        return [s for s in self.layers if not s.reason]

    def table(self) -> str:
        """The per-layer table: mean/std before, after on each measured split."""
        splits = [self.config.split] + ([self.config.holdout] if self.config.holdout else [])
        return format_table(
            self.layers,
            splits=splits,
            solve_split=self.config.split,
            target_std=self.config.target_std,
            tol=self.config.tol,
            mode=self.config.mode,
        )


@dataclass
class _Run:
    """One call's live objects, from the options to the store's path."""

    config: RunConfig
    out: Path
    model: nn.Module
    train: Source
    holdout: Source | None
    identity: dict
    device: torch.device
    progress: Progress
    allow_tf32: bool
    cache: bool
    cache_budget: int | None
    overwrite: bool
    allow_mixed: bool
    forward: ForwardFn | None = None
    mask: MaskFn | None = None
    ranks: Ranks | None = None


@keeps_callers_rng
def compute(
    config: RunConfig,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    data=None,
    holdout_data=None,
    collate=None,
    forward_fn: ForwardFn | None = None,
    mask_fn: MaskFn | None = None,
    data_root: str | Path | None = None,
    download: bool = True,
    device: str | torch.device | None = "auto",
    workers: int | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    scheduler_timeout: float = 20.0,
    executor: Executor | None = None,
    allow_tf32: bool = False,
    cache: bool = True,
    cache_memory: int | str | None = None,
    progress: Progress | bool = False,
    overwrite: bool = False,
    allow_mixed_hardware: bool = False,
    distributed: bool | None = None,
    loader_workers: int | None = None,
) -> RunResult:
    """Compute the full-dataset LSUV init of a model and write it to a run store.

    Rerunning the same call resumes an interrupted run, or does no pass at all when the
    store is complete for the same config, data and model. The caller's RNG states are
    left as they were.

    Args:
        config: What to compute. out: The run store (a Zarr group).
        model: A model to initialize in place (default: ``config.model``, ``config.seed``).
        data, holdout_data: Your own training and held-out data instead of
            ``config.dataset`` (a map-style Dataset or a sized collection of batches; see
            ``data.source_from``), batched by ``collate``.
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch, given whole
            as the data yields it (labels too); default ``model(**batch)`` for a dict batch,
            ``model(x)`` for a tensor or an ``(x, y)`` pair (``batches.py``).
        mask_fn: ``mask_fn(batch)`` gives a ``(N, L)`` tensor, true at the token positions
            the statistics count (e.g. ``lambda b: b["attention_mask"]``): padding is left
            out of every ``(N, L, C)`` Linear output's moments.
        data_root, download: Where the named datasets are; fetch a missing one.
        device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"``; on a cluster, what workers use.
        workers, scheduler, scheduler_file, scheduler_timeout: Run on a local dask cluster
            of N workers, or on an existing one; seconds to wait for it.
        executor: An executor of your own (overrides the three above); default inline.
        allow_tf32: Let CUDA use TF32 in the passes (faster; results then differ by GPU).
        cache, cache_memory: Keep activations between passes (same results, ``cache.py``)
            within this many bytes or e.g. ``"4GB"`` (default: half the free memory).
        progress: ``True`` for progress bars on stderr, or a :class:`Progress`.
        overwrite: Replace a store of another config, data or model, or a damaged one.
        allow_mixed_hardware: Let passes run with another numerics fingerprint than the
            run's (other dask workers or ranks, a resume elsewhere); recorded in the store.
        distributed: In an initialized ``torch.distributed`` group of several ranks, call
            this on every rank: the ranks split the shards and all end with the same
            weights; only rank 0 writes ``out`` (``ranks.py``). ``None``: so whenever such
            a group exists; ``False``: this process alone.
        loader_workers: Threads that load the data: decode a batch's images and read the
            next batches while one computes (0: all in the calling thread; default: the
            cores available, at most 8). Results are the same bytes for any number, and it
            is not part of the run's identity. A ``data`` Dataset's ``__getitem__`` runs on
            several threads at once only when this is given (it must then be thread-safe);
            by default its items are read one at a time, ahead of the model.

    Raises:
        LsuvError: Bad configuration, data, model or store, or a layer that cannot be solved.
        OffTarget: A solved layer misses ``config.tol`` after the solve (store complete).
        Interrupted: Ctrl-C; the store keeps everything finished so far.
    """
    run, executors = _prepare(dict(locals()))
    if run.ranks is not None and not run.ranks.main:
        return _follow(run, executors)
    told = [run.ranks is None]  # whether the other ranks know how the run starts

    def tell(store: RunStore | None) -> None:
        if not told[0]:
            run.ranks.broadcast((None, pack(store and store.path, skip=(LOCK_NAME,))))
            told[0] = True

    try:
        return _locked(run, executors, tell)
    except Exception as exc:
        if not told[0]:  # the other ranks wait to hear: they stop with the same error
            run.ranks.broadcast(((type(exc).__name__, str(exc)), None))
        raise


def _locked(run: _Run, executors, tell) -> RunResult:
    """Hold the store's lock, open the executor, then resume, solve or find it up to date;
    ``tell(store)`` shares what the store holds with the other ranks of a group."""
    exists = RunStore.check_out(run.out)
    try:
        with writer_lock(run.out) as stale, stop_on_sigint() as stop, executors as ex:
            if hasattr(ex, "dashboard"):
                run.progress.note(f"{ex.description}; dashboard: {ex.dashboard}")
            if stale:
                run.progress.warn(
                    f"took over the lock of a writer that is gone (pid {stale.get('pid')})"
                )
            store = _existing(run) if exists else None
            tell(store)
            if store is not None and store.attrs.get("status") == "complete":
                return _up_to_date(store, run)
            ctx = PassContext(ex, run.model, run.device, run.config.shard_size, run.progress, stop)
            return _solve(run, store, ctx)
    except ReadOnlyStore:
        # nothing can write here, so nothing is writing: a complete store of this very run
        # is up to date without the lock; anything else needs a writable store
        if exists:
            store = RunStore.open(run.out)
            same = not differences(stored_identity(store.attrs), run.identity)
            if same and store.attrs.get("status") == "complete":
                tell(store)
                return _up_to_date(store, run)
        raise


def _follow(run: _Run, executors) -> RunResult:
    """A rank other than 0: the same run from a copy of rank 0's store, in a temporary
    folder removed on return; the result names rank 0's store."""
    failure, held = run.ranks.broadcast()
    if failure is not None:
        raise_from(0, failure)
    with scratch_folder("lsuv-rank-") as tmp:
        out = tmp / "run.zarr"
        if held is not None:
            unpack(held, out)
        local = dataclasses.replace(run, out=out)
        try:
            with stop_on_sigint() as stop, executors as ex:
                store = RunStore.open(out, write=True) if held is not None else None
                if store is not None and store.attrs.get("status") == "complete":
                    result = _up_to_date(store, local)
                else:
                    ctx = PassContext(ex, run.model, run.device, run.config.shard_size,
                                      run.progress, stop)  # fmt: skip
                    result = _solve(local, store, ctx)
        except OffTarget as exc:
            exc.result.path = run.out
            raise
    result.path = run.out
    return result


def _prepare(o: dict) -> tuple[_Run, contextlib.AbstractContextManager]:
    """Turn :func:`compute`'s options into the run's live objects and its executor (to be
    entered), refusing bad ones before anything is written."""
    dev = resolve_device(o["device"])
    ranks = current(o["distributed"])
    dask = any(o[k] is not None for k in ("workers", "scheduler", "scheduler_file"))
    if ranks is not None and dask and o["executor"] is None:
        raise ConfigError(
            f"--workers / --scheduler / --scheduler-file in a torch.distributed group of "
            f"{ranks.world} ranks: the ranks already split the shards; use one or the other "
            "(distributed=False runs this process alone)"
        )
    try:
        budget = parse_size(o["cache_memory"])
    except ValueError as exc:
        raise ConfigError(f"--cache-memory: {exc}") from None
    config = recorded_config(o["config"], model_given=o["model"] is not None)
    data = o["data"]
    root = resolve_root(o["data_root"]) if data is None else Path(".")
    forward, mask = o["forward_fn"], o["mask_fn"]
    for option, fn in (("forward_fn", forward), ("mask_fn", mask)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{option} must be callable, got {type(fn).__name__}")
    train, holdout = open_sources(config, root, o["download"], data, o["holdout_data"],
                                  o["collate"], whole=forward is not None)  # fmt: skip
    workers = o["loader_workers"]
    if workers is None:
        workers = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"loader_workers must be an integer >= 0, got {workers!r}")
    for source in (train, holdout):
        if source is not None:
            source.set_loader_workers(workers, callers_items=o["loader_workers"] is not None)
    model, provenance = model_for(config, o["model"], train)
    for option, fn in (("forward_fn", forward), ("mask_fn", mask)):
        if fn is not None:
            provenance = {**provenance, option: B.callable_name(fn)}
    config = with_default_tol(config, model_dtype(model))  # recorded as used, not as None
    held = holdout.fingerprint if holdout is not None else None
    ident = identity(config, train.fingerprint, held, provenance)
    progress = as_progress(o["progress"])
    if ranks is not None:
        ident = _same_on_every_rank(ranks, ident, model, progress)
        if not ranks.main:
            progress = Progress()  # rank 0 shows it
    run = _Run(
        config=config,
        out=Path(o["out"]),
        model=model,
        train=train,
        holdout=holdout,
        identity=ident,
        device=dev,
        progress=progress,
        allow_tf32=o["allow_tf32"],
        cache=o["cache"],
        cache_budget=budget,
        overwrite=o["overwrite"],
        allow_mixed=o["allow_mixed_hardware"],
        forward=forward,
        mask=mask,
        ranks=ranks,
    )
    if o["executor"] is not None:  # a caller's own: used as it is, left open
        return run, contextlib.nullcontext(o["executor"])
    if ranks is not None:
        executor = RankExecutor(ranks, config.shard_size, allow_mixed=o["allow_mixed_hardware"])
        return run, contextlib.nullcontext(executor)
    return run, open_executor(
        workers=o["workers"],
        scheduler=o["scheduler"],
        scheduler_file=o["scheduler_file"],
        device_type=dev.type,
        timeout=o["scheduler_timeout"],
        allow_mixed=o["allow_mixed_hardware"],
    )


def _same_on_every_rank(ranks: Ranks, ident: dict, model: nn.Module, progress: Progress) -> dict:
    """Check that every rank runs the same config, data and model; give every rank rank
    0's initial weights when they differ (as DDP does). Returns rank 0's identity."""
    first, differ = agree(ranks, ident, differences)
    if differ:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        state = ranks.broadcast(state if ranks.main else None)
        if ranks.main:
            progress.warn(
                f"note: the model's initial weights differ on rank(s) "
                f"{', '.join(map(str, differ))}; every rank starts from rank 0's"
            )
        else:
            assign_state_(model, state)
    return first


#: How to replace a store, said to both kinds of caller.
_OVERWRITE = "--overwrite (overwrite=True from Python)"


def _existing(run: _Run) -> RunStore | None:
    """Open the run store at ``run.out`` to resume it or find it up to date; ``None`` when
    it held another run (or was damaged) and ``overwrite`` cleared it."""
    try:
        store = RunStore.open(run.out, write=True)
    except ReadOnlyStore:
        raise
    except StoreError as exc:
        if not run.overwrite:
            raise StoreError(f"{exc}; pass {_OVERWRITE} to replace it") from None
        RunStore.wipe(run.out, keep=(LOCK_NAME,))
        return None
    differ = differences(stored_identity(store.attrs), run.identity)
    if differ and not run.overwrite:
        raise StoreError(
            f"{str(run.out)!r} holds a run of another configuration or dataset "
            f"({'; '.join(differ)}); pass {_OVERWRITE} to replace it, or choose another store"
        )
    if differ:
        RunStore.wipe(run.out, keep=(LOCK_NAME,))
        return None
    return store


def _up_to_date(store: RunStore, run: _Run) -> RunResult:
    load_init(run.model.to(run.device), store.path, allow_off_target=True)
    result = RunResult(store.path, run.model, run.config, run_stats(store), up_to_date=True)
    return _checked(result, store.attrs)


def _checked(result: RunResult, attrs: dict) -> RunResult:
    """Raise :class:`OffTarget` when the store's verification found layers off target."""
    record = attrs.get("verification") or {}
    result.off_target = list(record.get("off_target") or [])
    if result.off_target:
        raise OffTarget(
            f"{len(result.off_target)} solved layer(s) miss the tolerance {record.get('tol'):g} "
            f"on {record.get('split')!r} after LSUV: {', '.join(result.off_target)} (see the "
            f"table; the store {str(result.path)!r} records it)",
            result,
        )
    return result


def _listing(plan: LayerPlan) -> str:
    """The layers a run will solve, in forward order, and those it leaves, as one note."""
    names = [i.name or "(model)" for i in plan.layers]
    shown = ", ".join(names) if len(names) <= 30 else ", ".join(names[:30]) + ", ..."
    text = f"solving {len(names)} layer(s) in forward order: {shown}"
    left = [u for u in plan.unsolved if u.reason != "left out by --include / --exclude"]
    options = len(plan.unsolved) - len(left)
    if options:
        text += f" ({options} left out by --include / --exclude)"
    for u in left[:30]:
        text += f"\nnot solving {u.name or '(model)'!r} ({u.kind}): {u.reason}"
    if len(left) > 30:
        text += f"\n... and {len(left) - 30} more not solved (listed in the store)"
    return text


def _start(run: _Run, store: RunStore | None, plan: LayerPlan, numerics: dict) -> RunStore:
    """Create the run's store, or check that the one to resume fits this model."""
    config, model = run.config, run.model
    if store is None:
        if config.orthogonal:
            generator = torch.Generator(device=run.device).manual_seed(config.seed)
            orthogonal_([get_layer(model, i.name) for i in plan.layers], generator=generator)
        attrs = root_attrs(
            config=run.identity["config"],
            dataset=run.train.describe(),
            holdout=run.holdout.describe() if run.holdout is not None else None,
            model=run.identity["provenance"],
            layers=[i.to_dict() for i in plan.layers],
            unsolved=[u.to_dict() for u in plan.unsolved],
            tied=[dataclasses.asdict(f) for f in plan.followers],
            device=run.device.type,
            allow_tf32=run.allow_tf32,
            numerics={**numerics, "key": numerics_key(numerics)},
        )
        store = RunStore.create(run.out, attrs)
        store.write_state("initial", model.state_dict())
        return store
    stored = [d["name"] for d in store.attrs["layers"]]
    if stored != [i.name for i in plan.layers]:
        raise StoreError(
            f"{str(run.out)!r} was started for layers {stored}, this model has "
            f"{[i.name for i in plan.layers]}; pass {_OVERWRITE} to start again"
        )
    initial = store.read_state("initial")
    check_fits(model, initial, repr(str(run.out)), strict=True)
    assign_state_(model, initial)
    record = store.attrs.get("numerics") or {}
    resumed = check_resume(record, numerics, allow_mixed=run.allow_mixed, where=repr(str(run.out)))
    if resumed != record:
        store.update_attrs({"numerics": resumed})
    run.progress.note(f"resuming {run.out}")
    return store


def _cache_token(run: _Run, plan: LayerPlan, example) -> str | None:
    """A token for the run's activation cache, or ``None`` (said once) when it is off."""
    if not run.cache:
        return None
    if run.forward or run.mask or not isinstance(example, torch.Tensor):
        run.progress.note(
            "activation cache off: the batches are not one tensor given to the model "
            "(forward_fn, mask_fn or dict batches); each pass runs from the input"
        )
        return None
    if plan.followers:
        tie = plan.followers[0]
        run.progress.note(
            f"activation cache off: {tie.name!r} shares its weight with {tie.leader!r} "
            "(tied); each pass runs from the input"
        )
        return None
    try:
        Segments(run.model, plan.layers)
    except Uncacheable as why:
        run.progress.note(f"activation cache off: {why}; each pass runs from the input")
        return None
    return f"{uuid.uuid4().hex}-{run.device}"


def _solve(run: _Run, store: RunStore | None, ctx: PassContext) -> RunResult:
    """Plan the layers, create or resume the store, run the layer loop and verification."""
    config, model = run.config, run.model
    model.to(run.device)
    compiling = _compile(run, ctx)  # before the store: where it cannot be built, stop here
    example = B.to_device(run.train.batch(0, min(2, run.train.count)), run.device)
    traced = trace(model, example, run.forward)
    plan = plan_layers(model, traced, include=config.include, exclude=config.exclude,
                       mode=config.mode, reinit=config.orthogonal)  # fmt: skip
    run.progress.warn(_listing(plan))  # shown even with -q: what is solved and what is not
    resumed = store is not None
    store = _start(run, store, plan, ctx.executor.numerics(run.device))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    setup = Setup(
        config,
        plan,
        store,
        ctx,
        run.train,
        run.allow_tf32,
        _cache_token(run, plan, example),
        run.cache_budget,
        run.forward,
        run.mask,
    )
    loop = LayerLoop(setup)
    started = time.perf_counter()
    try:
        stats = loop.run()
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        store.write_state("final", final)
        seconds = time.perf_counter() - started
        if config.verify:
            stats = loop.verify(stats, initial, final, run.holdout)
            record = {
                "split": config.split,
                "tol": config.tol,
                "off_target": off_target(stats, config),
            }
            store.update_attrs({"verification": record})
    except Interrupted:
        done = sum(store.committed(i.name) for i in plan.layers)
        raise Interrupted(
            f"interrupted during {ctx.current!r} with {done} of {len(plan.layers)} layers "
            f"solved; finished shards are kept in {str(run.out)!r}: rerun the same command to "
            "resume"
        ) from None
    record, new = with_mixed(store.attrs.get("numerics") or {}, ctx.executor.mixed)
    if new:
        store.update_attrs({"numerics": record})
        run.progress.warn(
            f"note: {new} other numerics fingerprint(s) computed shards of this run "
            "(--allow-mixed-hardware); recorded in the store, whose bytes now depend on "
            "which worker ran which shard"
        )
    for module in model.modules():  # passes ran in inference mode: no inference weights left
        refresh_weight_norm_(module)
    store.finish()
    rows = with_unsolved(stats, plan.unsolved)
    result = RunResult(run.out, model, config, rows, loop.passes, seconds, resumed=resumed,
                       compile_seconds=compiling)  # fmt: skip
    return _checked(result, store.attrs)


def _compile(run: _Run, ctx: PassContext) -> float:
    """Build the compiled kernel wherever the passes run, before the first pass
    (``config.compile``); say how long it took."""
    if not run.config.compile or run.device.type != "cpu":
        return 0.0
    dtype = model_dtype(run.model) or torch.float32
    half = dtype in (torch.float16, torch.bfloat16)  # reduced in float32 (moments.from_batch)
    seconds = ctx.executor.compile(torch.float32 if half else dtype)
    if seconds:
        run.progress.note(f"--compile: the moments kernel compiled in {seconds:.1f} s")
    return seconds
