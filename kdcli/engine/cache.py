"""An exact cache of a frozen teacher's outputs for every augmentation view of every training image.

CIFAR's training augmentation is finite: a pad-4 random crop (81 corners) times a horizontal flip is
162 views of each 32x32 image (:class:`kdcli.data.ViewGrid`). The teacher is frozen, so its output on
a view never changes: ``kdcli cache-teacher`` computes it once for every view of every training image
(logits, and pre-logit features when asked, stored as fp16), and ``distill`` then looks up the view the
loader drew instead of running the teacher (:class:`CachedTeacher`, behind the engine's teacher seam).

On disk a cache is a folder::

    manifest.json            fingerprint, outputs, shapes, progress
    shard-00000.safetensors  outputs of images [0, shard_images) as (n, views, dim) fp16 tensors
    ...

Shards are written atomically one at a time, so a killed build resumes where it stopped. The
fingerprint names what the outputs depend on (teacher architecture and weights, dataset contents,
augmentation grid and normalisation, kdcli version); a run whose fingerprint differs is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdcli.data import TensorSplit, ViewGrid
from kdcli.data.loader import crop_flip, normalise
from kdcli.devices import autocast
from kdcli.engine.io import atomic_save, cache_root, write_json
from kdcli.errors import UserError
from kdcli.models import Features, Taps, forward_taps

FORMAT = 1
SHARD_IMAGES = 256


def fingerprint(teacher: nn.Module, arch: str, split: TensorSplit, dataset: str,
                precision: str) -> dict[str, object]:
    """What a teacher's outputs on the views of ``split``'s source depend on (``precision``: the teacher's,
    resolved: a bf16 teacher's outputs are not an fp32 run's)."""
    import kdcli

    return {
        "format": FORMAT, "kdcli": kdcli.__version__, "teacher_arch": arch, "teacher_weights": weights_digest(teacher),
        "teacher_precision": precision, "dataset": dataset, "data": split.digest(),
        "crop_padding": split.crop_padding, "hflip": split.hflip, "mean": list(split.mean), "std": list(split.std),
    }


def weights_digest(network: nn.Module) -> str:
    """SHA-256 of a network's state (names, dtypes, shapes and values)."""
    sha = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        sha.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        sha.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


def default_dir(print_: dict[str, object], features: bool) -> Path:
    """The shared cache folder of a fingerprint (one with pre-logit features, one without): every run of that
    teacher on that data finds it."""
    key = hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:16]
    kind = "features" if features else "logits"
    return cache_root() / "teacher-outputs" / f"{print_['teacher_arch']}-{print_['dataset']}-{key}-{kind}"


def serves(outputs: list[str], taps: Taps) -> bool:
    """Whether cached ``outputs`` hold everything ``taps`` asks of the teacher."""
    wanted = {"logits"} if taps.logits else set()
    wanted |= {"pre_logits"} if taps.pre_logits else set()
    return not (taps.feature_map or taps.stages) and wanted <= set(outputs)


@dataclass
class Manifest:
    fingerprint: dict[str, object]
    outputs: list[str]
    images: int
    views: int
    shard_images: int

    @property
    def shards(self) -> int:
        return -(-self.images // self.shard_images)

    def shard_path(self, folder: Path, index: int) -> Path:
        return folder / f"shard-{index:05d}.safetensors"

    def missing(self, folder: Path) -> list[int]:
        return [i for i in range(self.shards) if not self.shard_path(folder, i).is_file()]

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        path = folder / "manifest.json"
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise UserError(f"teacher cache {folder}: manifest.json is unreadable ({error}); delete the folder and "
                            "run kdcli cache-teacher again") from None


def differences(cached: dict[str, object], wanted: dict[str, object]) -> list[str]:
    """The fingerprint fields that differ, as ``field (cache X, run Y)``; digests are shortened."""
    def short(value: object) -> str:
        return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)

    return [f"{key} (cache {short(cached.get(key))}, run {short(wanted.get(key))})"
            for key in sorted(set(cached) | set(wanted)) if cached.get(key) != wanted.get(key)]


# -- building ----------------------------------------------------------------------------------------
def build(network: nn.Module, split: TensorSplit, folder: Path, print_: dict[str, object], *, features: bool,
          channels_last: bool, device: torch.device, batch_size: int = 1024,
          progress: Callable[[int, int], None] | None = None) -> tuple[Manifest, int]:
    """Compute (or finish) the cache of ``network`` on every view of every image of ``split`` in ``folder``.

    ``network`` is the teacher prepared as the engine runs it (eval mode, folded, channels-last when
    ``channels_last``), run in the fingerprint's precision, so a cached output equals a live teacher call
    up to fp16 rounding. ``split`` must be the whole source
    (no carve-out). ``progress(done, total)`` is called after each shard. Returns the manifest and the
    number of teacher forwards this call ran (0 when the cache was complete).
    """
    if split.origin is not None:
        raise ValueError("build the cache on the whole training split, not a carve-out")
    outputs = ["logits", "pre_logits"] if features else ["logits"]
    grid = ViewGrid(split.crop_padding, split.hflip)
    manifest = Manifest(print_, outputs, len(split), grid.count, SHARD_IMAGES)
    existing = Manifest.read(folder)
    if existing is not None and (existing.fingerprint, existing.outputs) != (print_, outputs):
        what = differences(existing.fingerprint, print_) or [f"outputs (cache {existing.outputs}, run {outputs})"]
        raise UserError(f"{folder} holds a teacher cache for something else: {'; '.join(what)}; "
                        "choose another --out or delete that folder")
    if existing is not None:
        manifest = existing
    write_json(folder / "manifest.json", vars(manifest))
    todo, forwards = manifest.missing(folder), 0
    if progress is not None:
        progress(manifest.shards - len(todo), manifest.shards)
    for done, index in enumerate(todo, start=1):
        first = index * manifest.shard_images
        rows = torch.arange(first, min(first + manifest.shard_images, manifest.images))
        tensors = _shard(network, split, rows, grid, outputs, str(print_["teacher_precision"]), channels_last,
                         device, batch_size)
        atomic_save(manifest.shard_path(folder, index), lambda tmp, t=tensors: save_file(t, tmp))
        forwards += rows.numel() * grid.count
        if progress is not None:
            progress(manifest.shards - len(todo) + done, manifest.shards)
    return manifest, forwards


@torch.inference_mode()
def _shard(network: nn.Module, split: TensorSplit, rows: Tensor, grid: ViewGrid, outputs: list[str], precision: str,
           channels_last: bool, device: torch.device, batch_size: int) -> dict[str, Tensor]:
    """The outputs of every view of images ``rows``: ``{name: (len(rows), views, dim) fp16}``."""
    views = torch.arange(grid.count)
    image_of = rows.repeat_interleave(grid.count)  # (rows x views), view-major within an image
    view_of = views.repeat(rows.numel())
    mean = torch.tensor(split.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(split.std, device=device).view(1, 3, 1, 1)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    taps = Taps(logits=True, pre_logits="pre_logits" in outputs)
    chunks: dict[str, list[Tensor]] = {name: [] for name in outputs}
    for start in range(0, image_of.numel(), batch_size):
        images = split.images[image_of[start:start + batch_size]].to(device)
        offsets, flips = grid.params(view_of[start:start + batch_size])
        images = crop_flip(images, offsets.to(device), flips.to(device), grid.padding)
        with autocast(device, precision):
            out = forward_taps(network, normalise(images, mean, std, memory), taps)
        for name in outputs:
            chunks[name].append(getattr(out, name).half().cpu())
    return {name: torch.cat(parts).view(rows.numel(), grid.count, -1).contiguous() for name, parts in chunks.items()}


# -- replaying ---------------------------------------------------------------------------------------
class CachedTeacher:
    """The teacher's cached outputs, looked up by (image, view): the engine's teacher seam replays them.

    ``origin`` maps the training split's rows to rows of the cache (the cache covers the whole source
    split, so it serves any validation carve-out of it).
    """

    def __init__(self, outputs: dict[str, Tensor], origin: Tensor, folder: Path | None = None) -> None:
        """``outputs``: name -> (images, views, dim) table on the run's device; ``origin`` on that device too."""
        self.outputs, self.origin, self.folder = outputs, origin, folder

    @classmethod
    def load(cls, folder: Path, manifest: Manifest, origin: Tensor, device: torch.device) -> CachedTeacher:
        """Read every shard of a complete cache into one table per output, on ``device``."""
        parts: dict[str, list[Tensor]] = {name: [] for name in manifest.outputs}
        for index in range(manifest.shards):
            path = manifest.shard_path(folder, index)
            try:
                shard = load_file(str(path))
                for name in manifest.outputs:
                    parts[name].append(shard[name])
            except (SafetensorError, OSError, KeyError) as error:
                raise UserError(f"teacher cache shard {path} is unreadable ({type(error).__name__}); delete it and run "
                                "kdcli cache-teacher again to recompute it") from None
        return cls({name: torch.cat(tables).to(device) for name, tables in parts.items()}, origin.to(device), folder)

    def __call__(self, indices: Tensor, views: Tensor) -> Features:
        """float32 outputs of the views ``views`` of the split's images ``indices``."""
        rows = self.origin[indices]
        found = {name: table[rows, views].float() for name, table in self.outputs.items()}
        return Features(logits=found.get("logits"), pre_logits=found.get("pre_logits"))


def open_cache(setting: str, print_: dict[str, object], taps: Taps, origin: Tensor, device: torch.device,
               live_because: str = "") -> tuple[CachedTeacher | None, str]:
    """The cache a run asked for (``teacher.cache``: ``auto``, ``off`` or a folder) and a line saying what it does.

    ``auto`` uses the first complete default folder of ``print_`` that holds what ``taps`` needs (with
    features, then logits only); a named folder must exist, be complete and match ``print_`` (else
    :class:`UserError` naming what differs). A cache that cannot serve ``taps``, or any cache when
    ``live_because`` gives a reason (a method that mixes images), is not loaded: the line says why.
    """
    if setting == "off":
        return None, ""
    if setting == "auto":
        return _auto(print_, taps, origin, device, live_because)
    folder = Path(setting).expanduser()
    manifest = Manifest.read(folder)
    if manifest is None:
        raise UserError(f"teacher.cache {folder} holds no teacher cache (no manifest.json); build one with "
                        "kdcli cache-teacher --recipe <recipe> --out <folder>, or set teacher.cache=auto")
    what = differences(manifest.fingerprint, print_)
    if what:
        raise UserError(f"teacher cache {folder} does not match this run: {'; '.join(what)}; rebuild it with "
                        "kdcli cache-teacher, or set teacher.cache=off")
    missing = manifest.missing(folder)
    if missing:
        raise UserError(f"teacher cache {folder} is incomplete ({manifest.shards - len(missing)}/{manifest.shards} "
                        "shards); finish it with the same kdcli cache-teacher command")
    return _use(folder, manifest, taps, origin, device, live_because)


def _auto(print_: dict[str, object], taps: Taps, origin: Tensor, device: torch.device,
          live_because: str) -> tuple[CachedTeacher | None, str]:
    notes = []
    for folder in (default_dir(print_, features=True), default_dir(print_, features=False)):
        manifest = Manifest.read(folder)
        if manifest is None:
            continue
        missing = manifest.missing(folder)
        if missing:
            notes.append(f"teacher cache {folder} is incomplete ({manifest.shards - len(missing)}/{manifest.shards} "
                         "shards): the teacher runs live (finish it with the same kdcli cache-teacher command)")
            continue
        cache, note = _use(folder, manifest, taps, origin, device, live_because)
        if cache is not None:
            return cache, note
        notes.append(note)
    return None, notes[0] if notes else ""


def _use(folder: Path, manifest: Manifest, taps: Taps, origin: Tensor, device: torch.device,
         live_because: str) -> tuple[CachedTeacher | None, str]:
    """Load a complete, matching cache, unless it cannot serve ``taps`` or the method shows the teacher other images."""
    if live_because:
        return None, f"teacher cache {folder} not used: {live_because}; the teacher runs live"
    if not serves(manifest.outputs, taps):
        return None, _cannot_serve(folder, manifest.outputs, taps)
    return CachedTeacher.load(folder, manifest, origin, device), f"teacher outputs replayed from {folder}"


def _cannot_serve(folder: Path, outputs: list[str], taps: Taps) -> str:
    hint = " (kdcli cache-teacher --features adds pre-logits)" if not (taps.feature_map or taps.stages) else ""
    return (f"teacher cache {folder} holds {' and '.join(outputs)} only and this method taps more of the teacher: "
            f"it runs live{hint}")
