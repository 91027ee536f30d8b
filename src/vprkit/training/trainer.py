"""The trainer: places × images batches from (cached) features, a loss and a miner, validation, checkpoints.

Deterministic: every batch is a function of ``(seed, epoch, step)`` only (the place order of an
epoch comes from ``default_rng([seed, epoch])``, a batch's images from ``default_rng([seed,
epoch, step])``), and the model's initial state is drawn under ``torch.manual_seed(seed)``; so a
run resumed from :meth:`Trainer.save`'s checkpoint (head, loss, optimiser and schedule state, step
counter, history) takes exactly the step the uninterrupted run would have taken.

Validation (every epoch): Recall@1/5/10/20 of the head's descriptors, queries against a database,
with :func:`vprkit.evaluation.metrics.recall_at_n`; the best by Recall@1 is kept. The validation
set must be held out of *training* (``recipe``: ``[validation] holdout``), never the set the run is
finally judged on: picking the checkpoint on the evaluated set inflates its figure. A ``monitor``
set (e.g. that evaluated set) is only recorded (``monitor R@N`` in the history, for the curve),
never used to pick.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones.base import DenseFeatures
from ..datasets import GroundTruth
from ..device import module_device, resolve_device
from ..errors import ConfigError
from ..evaluation.metrics import recall_at_n
from .labels import PlaceLabels, restrict_tuples
from .losses import CLASSIFIER_LOSSES, make_loss
from .miners import MINERS, GeoMiner

RECALL_NS = (1, 5, 10, 20)
OPTIMISERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")
VALIDATION_CHUNK = 256
# History keys of the monitored (recorded, never selecting) set: "monitor R@1", ...
MONITOR_PREFIX = "monitor "


class FeatureSource(Protocol):
    def __len__(self) -> int: ...
    def batch(self, ids: Sequence[int] | np.ndarray) -> DenseFeatures: ...


@dataclass
class TrainSettings:
    """What a run does; every field has a recipe key of the same name (see :mod:`vprkit.training.recipe`)."""

    epochs: int = 10
    steps_per_epoch: int | None = None  # None: one pass over the places
    places_per_batch: int = 32
    images_per_place: int = 2
    loss: str = "multi-similarity"
    loss_options: dict = field(default_factory=dict)
    miner: str | None = "multi-similarity"
    miner_options: dict = field(default_factory=dict)
    optimiser: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    step_every: int = 1  # "step" schedule: epochs between ×step_gamma
    step_gamma: float = 0.5
    loss_lr: float | None = None  # classifier losses' weights (default: lr)
    # Unfrozen backbone blocks (extra_parameters): pretrained weights usually want a smaller step than a
    # fresh head. None: one parameter group with the head, at lr.
    backbone_lr: float | None = None
    seed: int = 0
    grad_clip: float | None = None
    # Feature-level augmentation of training batches (cached features cannot be re-cropped):
    # drop whole cells with this probability, and shift the grid by up to this many cells.
    feature_dropout: float = 0.0
    feature_shift: int = 0
    # The share of batches that are windows of consecutive places (PlaceSampler: near-neighbour negatives).
    contiguous_batches: float = 0.0
    # Where the head trains ("auto": CUDA, then MPS, then CPU — vprkit.device.resolve_device); batches follow it.
    device: str = "auto"

    def __post_init__(self):
        if self.optimiser not in OPTIMISERS:
            raise ConfigError(f"optimiser must be one of {OPTIMISERS}, got {self.optimiser!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.places_per_batch < 2 or self.images_per_place < 1 or self.epochs < 1:
            raise ConfigError("need places_per_batch ≥ 2, images_per_place ≥ 1 and epochs ≥ 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def place_groups(places: PlaceLabels, ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Images grouped by place: by class when the labels have classes, else each image with its positives."""
    ids = np.arange(places.n_rows) if ids is None else np.asarray(ids)
    if places.has_classes:
        cls = places.class_labels(ids).numpy()
        order = np.argsort(cls, kind="stable")
        splits = np.flatnonzero(np.diff(cls[order])) + 1
        return [ids[g] for g in np.split(order, splits) if len(g)]
    allowed = set(ids.tolist())
    return [np.array([i, *[j for j in places.positives_of(int(i)) if j in allowed]]) for i in ids]


class PlaceSampler:
    """``places_per_batch`` places × ``images_per_place`` images per batch, a pure function of (seed, epoch, step).

    ``contiguous`` (0–1): that share of the batches (drawn per step) takes a window of consecutive places
    in ``groups``' order — for frame labels, consecutive frames — instead of the epoch's shuffled places,
    so every negative is a near neighbour of its anchor (exact-frame discrimination); 0 leaves the
    batches exactly as without it.
    """

    def __init__(
        self,
        groups: list[np.ndarray],
        places_per_batch: int,
        images_per_place: int,
        seed: int = 0,
        contiguous: float = 0.0,
    ):
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups if len(g) >= 1]
        if len(self.groups) < places_per_batch:
            raise ConfigError(f"only {len(self.groups)} places for batches of {places_per_batch} places")
        if not 0.0 <= float(contiguous) <= 1.0:
            raise ConfigError(f"the share of contiguous batches must be in [0, 1], got {contiguous}")
        self.p, self.k, self.seed = int(places_per_batch), int(images_per_place), int(seed)
        self.contiguous = float(contiguous)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.groups) // self.p

    def batch(self, epoch: int, step: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        n = self.steps_per_epoch
        chosen = order[(step % n) * self.p : (step % n + 1) * self.p]
        if self.contiguous:  # a stream of its own, so the other batches' images are drawn as without windows
            w = np.random.default_rng([self.seed, epoch, step, 1])
            if w.random() < self.contiguous:
                start = int(w.integers(0, len(self.groups) - self.p + 1))
                chosen = np.arange(start, start + self.p)
        rng = np.random.default_rng([self.seed, epoch, step])
        out = []
        for g in chosen:
            group = self.groups[g]
            out.append(rng.choice(group, size=self.k, replace=len(group) < self.k))
        return np.concatenate(out)


@dataclass
class Validation:
    """Queries and database (ids into ``features``) with their ground truth."""

    features: FeatureSource
    query_ids: np.ndarray
    database_ids: np.ndarray
    ground_truth: GroundTruth
    ns: tuple[int, ...] = RECALL_NS


def on_device(feats: DenseFeatures, device: torch.device) -> DenseFeatures:
    """A batch of features where the head is (a no-op when they are there already)."""
    if feats.patches.device == device:
        return feats
    g = None if feats.global_token is None else feats.global_token.to(device)
    return DenseFeatures(feats.patches.to(device), feats.stride, feats.image_size, g)


def describe(
    head: torch.nn.Module, features: FeatureSource, ids: np.ndarray, chunk: int = VALIDATION_CHUNK
) -> torch.Tensor:
    """The head's descriptors of ``ids`` (eval mode, no gradients), on the CPU."""
    was = head.training
    head.eval()
    device = module_device(head)
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), chunk):
            out.append(head(on_device(features.batch(ids[i : i + chunk]), device)).float().cpu())
    head.train(was)
    return torch.cat(out)


def validate(head: torch.nn.Module, val: Validation) -> dict[str, Any]:
    """Recall@N of the head on ``val`` (inner-product ranking of L2-normalised descriptors)."""
    q = describe(head, val.features, np.asarray(val.query_ids))
    d = describe(head, val.features, np.asarray(val.database_ids))
    k = min(max(val.ns), len(d))
    ranked = torch.cat([torch.topk(q[i : i + 1024] @ d.T, k, dim=1).indices for i in range(0, len(q), 1024)]).numpy()
    return recall_at_n(ranked, val.ground_truth, val.ns)


class Trainer:
    """Trains ``head`` (and, with ``extra_parameters``, unfrozen backbone blocks) on ``features`` of ``places``.

    ``places`` are square labels over the ids of ``features``; ``train_ids`` (default: all) restrict
    training to part of them. ``on_epoch(trainer, record)`` is called after each epoch's validation.
    ``validation`` picks the best epoch; ``monitor`` is only recorded (see the module docstring).
    """

    def __init__(
        self,
        head: torch.nn.Module,
        features: FeatureSource,
        places: PlaceLabels,
        settings: TrainSettings,
        validation: Validation | None = None,
        train_ids: np.ndarray | None = None,
        extra_parameters: Sequence[torch.nn.Parameter] = (),
        progress: bool = True,
        on_best: Callable[["Trainer", dict], None] | None = None,
        on_epoch: Callable[["Trainer", dict], None] | None = None,
        monitor: Validation | None = None,
    ):
        if not places.square:
            raise ConfigError("training needs square place labels (one image set)")
        self.device = resolve_device(settings.device)
        self.head, self.features, self.places, self.s = head.to(self.device), features, places, settings
        self.validation, self.progress, self.on_best, self.on_epoch = validation, progress, on_best, on_epoch
        self.monitor = monitor
        self.sampler = PlaceSampler(
            place_groups(places, train_ids),
            settings.places_per_batch,
            settings.images_per_place,
            settings.seed,
            settings.contiguous_batches,
        )
        self.steps_per_epoch = settings.steps_per_epoch or self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * settings.epochs
        dim = int(head.dim)
        opts = dict(settings.loss_options)
        if settings.loss in CLASSIFIER_LOSSES:
            opts.setdefault("embedding_size", dim)
        with torch.random.fork_rng():
            torch.manual_seed(settings.seed)
            self.loss = make_loss(settings.loss, places, **opts).to(self.device)
        self.miner = None
        if settings.miner:
            mopts = dict(settings.miner_options)
            if settings.miner == "gps":
                mopts.setdefault("places", places)
            elif not places.has_classes:
                raise ConfigError(f"miner {settings.miner!r} needs class labels; these labels have none (use 'gps')")
            self.miner = MINERS.get(settings.miner)(**mopts)
        head_params = [p for p in head.parameters() if p.requires_grad]
        if settings.backbone_lr is None or not extra_parameters:
            groups = [{"params": head_params + list(extra_parameters)}]
        else:
            groups = [{"params": head_params}, {"params": list(extra_parameters), "lr": settings.backbone_lr}]
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        if loss_params:
            groups.append({"params": loss_params, "lr": settings.loss_lr or settings.lr})
        if settings.optimiser == "sgd":
            self.optimiser = torch.optim.SGD(
                groups, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
            )
        else:
            cls = torch.optim.Adam if settings.optimiser == "adam" else torch.optim.AdamW
            self.optimiser = cls(groups, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimiser, self._lr_factor)
        self.step = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.extra_parameters = list(extra_parameters)

    def _lr_factor(self, step: int) -> float:
        s = self.s
        if s.warmup_steps and step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.schedule == "cosine":
            t = min(1.0, (step - s.warmup_steps) / max(1, self.total_steps - s.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * t))
        if s.schedule == "step":
            return s.step_gamma ** (step // (s.step_every * self.steps_per_epoch))
        return 1.0

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def train_step(self) -> dict[str, float]:
        """One optimisation step on the batch of (epoch, step within the epoch)."""
        ids = self.sampler.batch(self.epoch, self.step % self.steps_per_epoch)
        self.head.train()
        emb = self.head(on_device(self._augment(self.features.batch(ids)), self.device))
        labels = torch.as_tensor(ids, device=self.device)
        tuples = None
        mined = None
        if self.miner is not None:
            mine_labels = labels if isinstance(self.miner, GeoMiner) else self.places.class_labels(ids).to(self.device)
            tuples = self.miner(emb, mine_labels)
            if not isinstance(self.miner, GeoMiner):
                # A class-label miner knows same / other class only; the labels may forbid more negatives
                # (soft positives, same-domain pairs with cross-domain negatives).
                tuples = restrict_tuples(tuples, *self.places.masks(ids, device=self.device))
            mined = int(len(tuples[0]))
        loss = self.loss(emb, labels, tuples)
        self.optimiser.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            if self.s.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimiser.param_groups for p in g["params"]], self.s.grad_clip
                )
            self.optimiser.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": float(loss.detach()), "mined": mined}

    def _augment(self, feats: DenseFeatures) -> DenseFeatures:
        s = self.s
        if not (s.feature_dropout or s.feature_shift):
            return feats
        g = torch.Generator().manual_seed(int(np.random.default_rng([s.seed, self.step, 7]).integers(2**62)))
        x = feats.patches
        if s.feature_shift:
            dy, dx = (int(v) for v in torch.randint(-s.feature_shift, s.feature_shift + 1, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
        if s.feature_dropout:
            keep = (torch.rand(x.shape[:3], generator=g) >= s.feature_dropout).to(x.dtype).unsqueeze(-1)
            x = x * keep / (1.0 - s.feature_dropout)
        return DenseFeatures(x, feats.stride, feats.image_size, feats.global_token)

    def fit(self, max_steps: int | None = None) -> list[dict]:
        """Train to the end of the schedule (or until step ``max_steps``), validating after each epoch."""
        stop = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        while self.step < stop:
            epoch = self.epoch
            end = min(stop, (epoch + 1) * self.steps_per_epoch)
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step % self.steps_per_epoch,
                desc=f"epoch {epoch + 1}/{self.s.epochs}",
                disable=not self.progress,
                leave=False,
                unit="step",
            )
            losses, t0 = [], time.perf_counter()
            r1 = self.history[-1].get("R@1") if self.history else None  # the current validation recall
            while self.step < end:
                out = self.train_step()
                losses.append(out["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}", **({"R@1": f"{r1:.3f}"} if r1 is not None else {}))
            bar.close()
            if self.step % self.steps_per_epoch == 0:
                self._end_epoch(epoch, losses, time.perf_counter() - t0)
        return self.history

    def _end_epoch(self, epoch: int, losses: list[float], seconds: float) -> None:
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.step,
            "loss": float(np.mean(losses)) if losses else None,
            "seconds": round(seconds, 2),
            "lr": self.scheduler.get_last_lr()[0],
        }
        if self.validation is not None:
            rec = validate(self.head, self.validation)
            record.update({f"R@{n}": rec[f"R@{n}"] for n in self.validation.ns})
        if self.monitor is not None:  # recorded for the curve only; never picks the checkpoint
            rec = validate(self.head, self.monitor)
            record.update({f"{MONITOR_PREFIX}R@{n}": rec[f"R@{n}"] for n in self.monitor.ns})
        self.history.append(record)
        if self.progress:
            shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
            tqdm.write(shown)
        key = "R@1" if "R@1" in record else None
        better = (
            self.best is None
            or (key is not None and record[key] > self.best[key])
            or (key is None and record["loss"] is not None and record["loss"] < self.best["loss"])
        )
        if better:
            self.best = dict(record)
            if self.on_best is not None:
                self.on_best(self, record)
        if self.on_epoch is not None:
            self.on_epoch(self, record)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "head": self.head.state_dict(),
            "loss": self.loss.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "extra": [p.detach().clone() for p in self.extra_parameters],
            "history": json.dumps(self.history),
            "best": json.dumps(self.best),
            "settings": json.dumps(self.s.to_dict()),
        }

    def save(self, path: str | Path) -> Path:
        """The full training state (to resume from); written atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> "Trainer":
        """Resume from :meth:`save`'s file: the next step is the one the uninterrupted run would take."""
        st = torch.load(path, map_location="cpu", weights_only=True)
        # Settings added after a run was saved compare at their defaults (so older runs still resume).
        saved = {**TrainSettings().to_dict(), **json.loads(st["settings"])}
        if saved != self.s.to_dict():
            raise ConfigError(f"{path} was saved by a run with other settings; resume with the same recipe")
        self.head.load_state_dict(st["head"])
        self.loss.load_state_dict(st["loss"])
        self.optimiser.load_state_dict(st["optimiser"])
        self.scheduler.load_state_dict(st["scheduler"])
        with torch.no_grad():
            for p, v in zip(self.extra_parameters, st["extra"]):
                p.copy_(v)
        self.step = int(st["step"])
        self.history = json.loads(st["history"])
        self.best = json.loads(st["best"])
        return self
