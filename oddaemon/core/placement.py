"""Where a job may run, pure: whether its GPU request can ever be met here, what it asks the
allocator for, which free GPUs it gets, and how two model_dirs collide. The scheduler
(``core/scheduler.py``) decides when; this decides what fits."""

from __future__ import annotations

from oddaemon.core.jobspec import JobSpec, gpu_count


def fits_ever(wants: int | tuple[int, ...], inventory: tuple[int, ...], cluster: bool = False) -> str | None:
    """None if the request can be met by this inventory (or the cluster) some day, else why not."""
    if cluster:
        return (None if not isinstance(wants, tuple) else
                "names GPU ids ([train] gpus), which a cluster's nodes do not share; ask for a count instead")
    if isinstance(wants, tuple):
        missing = [g for g in wants if g not in inventory]
        if missing:
            have = ", ".join(map(str, inventory)) or "none"
            return (f"asks for GPU id(s) {', '.join(map(str, missing))} ([train] gpus), which this machine does not "
                    f"have (GPUs: {have}); change [train] gpus")
        return None
    if wants > len(inventory):
        return (f"asks for {wants} GPU(s) but this machine has {len(inventory)}; change [train] gpus "
                f"(0 trains on the CPU)")
    return None


def model_dir_clash(mine: str, theirs: str) -> str | None:
    """How two (resolved) model_dirs collide: one, or one inside the other (their checkpoints,
    event files and best/ would mix), as words before "job 'x'"; None when they are apart."""
    if mine == theirs:
        return "is already used by"
    if mine.startswith(theirs.rstrip("/") + "/"):
        return "is inside the model_dir of"
    if theirs.startswith(mine.rstrip("/") + "/"):
        return "contains the model_dir of"
    return None


def clash_detail(clash: str, theirs: str) -> str:
    if clash == "is already used by":
        return "; two jobs cannot train into one model_dir"
    return f": {theirs}; a job's model_dir must not be inside another's, nor contain one"


def resolve_wants(spec: JobSpec, inventory: tuple[int, ...], cluster: bool = False) -> int | tuple[int, ...]:
    """What a job asks the allocator for: the GPU ids it names, else a count (``gpu_count``); on a
    cluster "auto" is one GPU (the cluster has them; this machine's count says nothing)."""
    gpus = spec.train.gpus
    return gpus if isinstance(gpus, tuple) else gpu_count(gpus, 1 if cluster else len(inventory))


def allocate(wants: int | tuple[int, ...], free: list[int]) -> tuple[int, ...] | None:
    """The GPU ids to grant from ``free``: the named ones when all are free, else the lowest free
    ones of a count; None when the request does not fit now."""
    if isinstance(wants, tuple):
        return wants if all(g in free for g in wants) else None
    if wants <= len(free):
        return tuple(sorted(free)[:wants])
    return None
