"""Score attribution methods against synthetic ground truth (``neuroexplain evaluate-attribution``).

Every held-out positive scan of the synthetic data keeps its ground-truth mask, so maps can be scored, not just
looked at. Metrics (all on the model grid, target = the ground-truth class, e.g. ``lesion``):

- ``share``: share of positive relevance inside the ground-truth mask dilated by ``DILATE_VOXELS`` voxels.
- ``rank_acc``: relevance rank accuracy (Arras et al. 2022): of the K most relevant brain voxels, K = mask size,
  the fraction inside the (undilated) mask.
- ``pointing``: pointing game: the most relevant voxel lies inside the dilated mask (1) or not (0).
- ``deletion_auc`` (lower is better) / ``insertion_auc`` (higher is better): target-class probability while the
  most relevant brain voxels are replaced by the reference (deletion) or copied from the scan into the reference
  (insertion), in ``CURVE_STEPS`` equal steps up to ``CURVE_MAX_FRACTION`` of the brain; area under the curve on
  x in [0, 1]. The reference is the MNI152 T1 template on the model grid (the healthy anatomy every synthetic scan
  is built from, the methods' ``template`` baseline): the model must call it healthy, so that the insertion curve
  starts at "no finding" and rises only when the inserted voxels carry the evidence. (A blurred copy of the scan,
  used before, is called ``lesion`` by the lesion model: every insertion curve then started near 1 and even a random
  map scored 0.99.) The run records the model's probability for the reference and says so when it is not healthy.
- ``rand_spearman``: sanity check (Adebayo et al. 2018): Spearman rank correlation, over brain voxels, of the
  absolute maps of the trained model and of the model with all its layers re-initialised (the last step of a
  cascading randomisation from the output layer down; the whole cascade is kept in the JSON). A method passes when
  it is below ``SANITY_THRESHOLD``.

The expensive parts run on documented subsets (see :class:`Plan`); every per-scan result is appended to a JSON-lines
file as soon as it exists, so an interrupted run resumes where it stopped (``--resume``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats
from torch import nn

from neuroexplain.attribution.methods import attribute_tensor, private_copy
from neuroexplain.attribution.options import METHOD_OPTIONS, Method, parse_options
from neuroexplain.errors import InvalidOptionError
from neuroexplain.models.registry import LoadedModel

DILATE_VOXELS = 2  # 4 mm on the 2 mm grid: tolerance for maps that peak on a lesion's rim
CURVE_STEPS = 10
CURVE_MAX_FRACTION = 0.05  # lesions cover < 2 % of the brain: the first 5 % of voxels is where the curve moves
CURVES_REFERENCE = "template"  # stored with every curve: curves made against another reference are not reused
SANITY_THRESHOLD = 0.3
RANDOM = "random"  # a seeded random map: the chance level every metric should beat

CHEAP = (
    Method.GRADIENT, Method.GRADIENT_X_INPUT, Method.GUIDED_BACKPROP, Method.GRADCAM,
    Method.LRP_EPSILON, Method.LRP_ALPHA_BETA, Method.LRP_COMPOSITE, Method.DEEPLIFT,
)
SAMPLED = (Method.INTEGRATED_GRADIENTS, Method.SMOOTHGRAD, Method.GRADIENT_SHAP)
PERTURBATION = (Method.OCCLUSION,)
METRICS = ("share", "rank_acc", "pointing", "deletion_auc", "insertion_auc", "rand_spearman")
_CURVE_METRICS = ("deletion_auc", "insertion_auc")


@dataclass(frozen=True)
class Plan:
    """Subset sizes (numbers of held-out positive scans, always the first ones of the same seed list).

    Attributes:
        scans: localisation metrics of the single-pass methods (gradient, LRP, DeepLIFT, Grad-CAM, ...).
        sampled_scans: every metric but randomisation for IG, SmoothGrad and GradientSHAP (tens of passes each).
        faithfulness_scans: deletion/insertion curves of the single-pass methods.
        occlusion_scans: every metric but randomisation for occlusion (one forward pass per patch).
        randomisation_scans: the whole cascading randomisation of the single-pass methods.
        sampled_randomisation_scans: the fully randomised model only, for IG, SmoothGrad and GradientSHAP.
        occlusion_randomisation_scans: the fully randomised model only, for occlusion.
        batch: scans per attribution call for the single-pass methods.
    """

    scans: int = 100
    sampled_scans: int = 8
    faithfulness_scans: int = 8
    occlusion_scans: int = 4
    randomisation_scans: int = 3
    sampled_randomisation_scans: int = 3
    occlusion_randomisation_scans: int = 3
    batch: int = 4

    def subset(self, method: Method | str, metric: str) -> int:
        """Number of scans ``metric`` is computed on for ``method``."""
        if method == RANDOM:
            return self.scans if metric in ("share", "rank_acc", "pointing") else self.faithfulness_scans
        if metric == "rand_spearman":
            if method in PERTURBATION:
                return self.occlusion_randomisation_scans
            return self.sampled_randomisation_scans if method in SAMPLED else self.randomisation_scans
        if method in PERTURBATION:
            return self.occlusion_scans
        if method in SAMPLED:
            return self.sampled_scans
        return self.scans if metric in ("share", "rank_acc", "pointing") else self.faithfulness_scans


@dataclass
class _Case:
    seed: int
    x: np.ndarray  # grid.shape, normalised model input
    mask: np.ndarray  # bool, ground truth
    dilated: np.ndarray  # bool
    brain: np.ndarray  # bool, x > 0


@dataclass
class Evaluation:
    """The aggregated table plus what it was computed from."""

    model: str
    model_version: str
    weights_sha256: str
    plan: Plan
    rows: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # method -> metric -> {mean, sd, n}
    extra: dict[str, Any] = field(default_factory=dict)


def _task_of(model: LoadedModel) -> Any:
    from neuroexplain.lab.synthetic import Task

    for task in Task:
        if model.spec.name == task.value or model.spec.task.startswith(task.value):
            if model.spec.grid.shape != (80, 96, 80):
                break
            return task
    raise InvalidOptionError(
        f"model {model.spec.name!r} has no synthetic ground truth to score against; "
        "evaluate-attribution supports the bundled models 'lesion' and 'atrophy'"
    )


def held_out_seeds(n: int) -> list[int]:
    """The first ``n`` held-out seeds whose synthetic scans are positive (lesion/atrophy present)."""
    from neuroexplain.lab.synthetic import HELD_OUT_SEED_START

    return [HELD_OUT_SEED_START + 1 + 2 * i for i in range(n)]


def _case(task: Any, seed: int) -> _Case:
    from neuroexplain.lab.synthetic import make_sample
    from neuroexplain.volumes import normalise

    s = make_sample(task, seed)
    x = normalise(s.image)
    brain = x > 0
    return _Case(seed, x, s.mask, ndimage.binary_dilation(s.mask, iterations=DILATE_VOXELS) & brain, brain)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics (public: tests check them against hand-made maps)


def localisation(rel: np.ndarray, mask: np.ndarray, dilated: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """``share``, ``rank_acc`` and ``pointing`` of one map (see the module docstring)."""
    pos = np.clip(rel, 0, None)
    total = float(pos.sum())
    share = float(pos[dilated].sum() / total) if total > 0 else 0.0
    k = int(mask.sum())
    vals = rel[brain]
    inside = mask[brain]
    top = np.argpartition(-vals, k - 1)[:k] if 0 < k <= vals.size else np.array([], dtype=int)
    rank_acc = float(inside[top].mean()) if top.size else 0.0
    peak = np.unravel_index(int(np.argmax(np.where(brain, rel, -np.inf))), rel.shape)
    return {"share": share, "rank_acc": rank_acc, "pointing": float(dilated[peak])}


def _auc(curve: Sequence[float]) -> float:
    y = np.asarray(curve, dtype=np.float64)
    return float(np.trapezoid(y, dx=1.0 / (len(y) - 1)))


def reference_volume(model: LoadedModel) -> np.ndarray:
    """The deletion/insertion reference: the MNI152 T1 template on the model grid (``grid.shape`` float32)."""
    from neuroexplain.template import anatomy

    return np.ascontiguousarray(anatomy(model.spec.grid).t1, dtype=np.float32)


def target_probability(module: nn.Module, volumes: np.ndarray, target: int, batch: int = 6) -> list[float]:
    """Softmax probability of ``target`` for each of ``volumes`` ``(N, D, H, W)``."""
    vols = torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))[:, None]  # (N, 1, D, H, W)
    probs: list[float] = []
    with torch.inference_mode():
        for start in range(0, vols.shape[0], batch):
            probs += torch.softmax(module(vols[start : start + batch]).float(), dim=1)[:, target].tolist()
    return probs


def perturbation_curves(
    module: nn.Module, x: np.ndarray, rel: np.ndarray, brain: np.ndarray, target: int, reference: np.ndarray
) -> dict[str, Any]:
    """Deletion and insertion curves (target probability per step) and their AUCs for one map.

    Deletion replaces the most relevant brain voxels of ``x`` by ``reference``; insertion copies them from ``x``
    into ``reference``; ``CURVE_STEPS`` equal steps up to ``CURVE_MAX_FRACTION`` of the brain, ties in stable order.
    """
    order = np.flatnonzero(brain.ravel())
    order = order[np.argsort(-rel.ravel()[order], kind="stable")]
    counts = np.linspace(0, CURVE_MAX_FRACTION * order.size, CURVE_STEPS + 1).astype(int)
    flat = x.ravel()
    ref = reference.ravel()
    deleted, inserted = [], []
    for c in counts:
        d = flat.copy()
        d[order[:c]] = ref[order[:c]]
        ins = ref.copy()
        ins[order[:c]] = flat[order[:c]]
        deleted.append(d.reshape(x.shape))
        inserted.append(ins.reshape(x.shape))
    probs = target_probability(module, np.stack(deleted + inserted), target)  # 2 * (steps + 1) volumes
    n = len(counts)
    return {
        "deletion": probs[:n], "insertion": probs[n:],
        "deletion_auc": _auc(probs[:n]), "insertion_auc": _auc(probs[n:]), "curves_reference": CURVES_REFERENCE,
    }


def randomisation_order(module: nn.Module) -> list[str]:
    """Top-level children with parameters, from the output back to the input (the cascade's order)."""
    return [name for name, child in reversed(list(module.named_children())) if any(True for _ in child.parameters())]


def randomise(module: nn.Module, names: Iterable[str], seed: int) -> None:
    """Re-initialise the parameters (and batch-norm statistics) of the named children, in place, seeded."""
    children = dict(module.named_children())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            for m in children[name].modules():
                reset: Any = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
                reset_stats: Any = getattr(m, "reset_running_stats", None)
                if callable(reset_stats):
                    reset_stats()
    for p in module.parameters():
        p.requires_grad_(False)


def spearman_abs(a: np.ndarray, b: np.ndarray, brain: np.ndarray) -> float:
    """Spearman rank correlation of ``|a|`` and ``|b|`` over brain voxels (0 where a map is constant)."""
    va, vb = np.abs(a[brain]), np.abs(b[brain])
    if np.ptp(va) == 0 or np.ptp(vb) == 0:
        return 0.0
    return float(stats.spearmanr(va, vb).statistic)


# ---------------------------------------------------------------------------------------------------------------------
# The run


class _Store:
    """Append-only JSON-lines cache of per-scan results, keyed by model digest, method, metric group and seed."""

    def __init__(self, path: Path, weights: str, resume: bool) -> None:
        self.path = path
        self.weights = weights
        self.done: dict[tuple[str, str, int], dict[str, Any]] = {}
        if resume and path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted run
                if rec.get("weights") == weights:
                    self.done[(rec["method"], rec["group"], int(rec["seed"]))] = rec
        elif path.exists():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)

    def has(self, method: str, group: str, seed: int) -> bool:
        return (method, group, seed) in self.done

    def add(self, method: str, group: str, seed: int, values: dict[str, Any]) -> None:
        rec = {"weights": self.weights, "method": method, "group": group, "seed": seed, **values}
        self.done[(method, group, seed)] = rec
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def _random_map(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng([seed, 7]).standard_normal(shape).astype(np.float32)


def _maps(
    module: nn.Module, model: LoadedModel, cases: Sequence[_Case], method: Method | str, target: int,
) -> list[np.ndarray]:
    if method == RANDOM:
        return [_random_map(c.seed, c.x.shape) for c in cases]
    m = Method(method)
    opts = parse_options(m, None)
    x = torch.from_numpy(np.stack([c.x for c in cases]))[:, None]
    out = attribute_tensor(
        private_copy(module, m), x, m, target, opts, grid=model.spec.grid, layer_names=[l.name for l in model.spec.layers]
    )
    return [a[0].numpy() for a in out]


def run_evaluation(
    model: LoadedModel,
    *,
    methods: Sequence[Method | str] | None = None,
    plan: Plan = Plan(),
    cache: Path,
    resume: bool = False,
    log: Callable[[str], None] = print,
    compute: bool = True,
) -> Evaluation:
    """Compute (or resume) every per-scan result the plan asks for, then aggregate the table.

    Args:
        model: a bundled model with synthetic ground truth (``lesion`` or ``atrophy``).
        methods: methods to score (default: all, plus the ``random`` chance row).
        plan: subset sizes.
        cache: JSON-lines file of per-scan results.
        resume: keep results already in ``cache`` for the same weights (else start afresh).
        log: progress lines (no patient data: seeds of synthetic scans only).
        compute: False aggregates what ``cache`` holds without computing anything (``--report-only``).
    """
    task = _task_of(model)
    chosen: list[Method | str] = list(methods) if methods else [RANDOM, *CHEAP, *SAMPLED, *PERTURBATION]
    for m in chosen:
        if m != RANDOM:
            Method.parse(m)
    chosen = [m if m == RANDOM else Method.parse(m) for m in chosen]
    target = len(model.spec.classes) - 1  # the positive class: lesion / atrophy
    store = _Store(cache, model.spec.weights_sha256 or "unknown", resume or not compute)
    module = model.module
    reference = reference_volume(model)
    reference_p = target_probability(module, reference[None], target)[0]
    if reference_p >= 0.5:
        log(f"warning: the model calls the deletion/insertion reference {model.spec.classes[target]!r} "
            f"(p = {reference_p:.3f}); the curves are not measured from a healthy reference")
    n_max = max(plan.subset(m, metric) for m in chosen for metric in METRICS)
    seeds = held_out_seeds(n_max)
    case_cache: dict[int, _Case] = {}

    def case(seed: int) -> _Case:
        if seed not in case_cache:
            if len(case_cache) > 24:
                case_cache.clear()
            case_cache[seed] = _case(task, seed)
        return case_cache[seed]

    def key(m: Method | str) -> str:
        return m if isinstance(m, str) else m.value

    t0 = time.monotonic()

    def done(m: Method | str, seed: int) -> bool:
        # A cached map counts only if it has every metric the plan now asks of it (a larger --faithfulness-scans
        # on --resume recomputes the scans that lack curves).
        if not store.has(key(m), "map", seed):
            return False
        rec = store.done[(key(m), "map", seed)]
        return seed not in seeds[: plan.subset(m, "deletion_auc")] or rec.get("curves_reference") == CURVES_REFERENCE

    # Maps of the trained model on the randomisation subset, kept from the maps phase so that the randomisation
    # phase does not compute them a second time (about half its work for the many-pass methods).
    trained_maps: dict[tuple[str, int], np.ndarray] = {}

    def maps_phase(ms: Sequence[Method | str]) -> None:
        # Localisation (and, for the first scans, faithfulness) of each method. Scan-major, so that an interrupted
        # run has every method on the same scans; single-pass methods take plan.batch scans per call.
        n_all = max(plan.subset(m, "share") for m in ms)
        for start in range(0, n_all, plan.batch):
            block = seeds[start : min(start + plan.batch, n_all)]
            for m in ms:
                todo = [s for s in block[: max(0, plan.subset(m, "share") - start)] if not done(m, s)]
                step = plan.batch if (m in CHEAP or m == RANDOM) else 1
                for i in range(0, len(todo), step):
                    group = [case(s) for s in todo[i : i + step]]
                    t = time.monotonic()
                    maps = _maps(module, model, group, m, target)
                    per = (time.monotonic() - t) / len(group)
                    for c, rel in zip(group, maps):
                        values: dict[str, Any] = localisation(rel, c.mask, c.dilated, c.brain)
                        if c.seed in seeds[: plan.subset(m, "deletion_auc")]:
                            values.update(perturbation_curves(module, c.x, rel, c.brain, target, reference))
                        values["seconds"] = per
                        store.add(key(m), "map", c.seed, values)
                        wanted = m != RANDOM and c.seed in seeds[: plan.subset(m, "rand_spearman")]
                        if wanted and not store.has(key(m), "randomisation", c.seed):
                            trained_maps[(key(m), c.seed)] = rel
            log(f"[{time.monotonic() - t0:7.0f}s] maps: scans {start + len(block)}/{n_all} ({', '.join(key(m) for m in ms)})")

    order = randomisation_order(module)

    def randomisation_phase(ms: Sequence[Method | str]) -> None:
        # Cascading randomisation from the output layer down; the last step is the fully randomised model.
        # The many-pass methods get that last step only.
        for m in [m for m in ms if m != RANDOM]:
            steps = [order[: i + 1] for i in range(len(order))] if m in CHEAP else [order]
            for s in seeds[: plan.subset(m, "rand_spearman")]:
                if store.has(key(m), "randomisation", s):
                    continue
                c = case(s)
                t = time.monotonic()
                trained = trained_maps.pop((key(m), s), None)
                reused = trained is not None
                if trained is None:  # resumed run: the maps phase found this scan done
                    trained = _maps(module, model, [c], m, target)[0]
                cascade = []
                for names in steps:
                    rnd = private_copy(module)
                    randomise(rnd, names, seed=s)
                    rel = _maps(rnd, model, [c], m, target)[0]
                    cascade.append({"randomised": list(names), "spearman": spearman_abs(trained, rel, c.brain)})
                secs = time.monotonic() - t
                store.add(key(m), "randomisation", s, {
                    "rand_spearman": cascade[-1]["spearman"], "cascade": cascade, "seconds": secs,
                    "trained_map_reused": reused,
                })
                log(f"[{time.monotonic() - t0:7.0f}s] {key(m)}: randomisation seed {s} ({secs:.1f} s, "
                    f"{len(steps)} randomised model{'s' if len(steps) > 1 else ''}"
                    f"{'' if reused else ' + the trained map again'})")

    if compute:
        # Cheapest first, so that an interrupted run has the 100-scan rows; then the many-pass methods.
        first = [m for m in chosen if m == RANDOM or m in CHEAP]
        rest = [m for m in chosen if m not in first]
        maps_phase(first)
        randomisation_phase(first)
        maps_phase(rest)
        randomisation_phase(rest)
    # Model behaviour on the scans, for context (sensitivity on the localisation subset).
    probs = []
    for s in seeds[: plan.scans]:
        if not store.has("_model", "prediction", s):
            if not compute:
                continue
            c = case(s)
            with torch.inference_mode():
                p = torch.softmax(module(torch.from_numpy(c.x)[None, None]).float(), dim=1)[0, target].item()
            store.add("_model", "prediction", s, {"p_target": p, "mask_voxels": int(c.mask.sum())})
        probs.append(store.done[("_model", "prediction", s)])
    ev = aggregate(model, plan, chosen, store.done, seeds, probs)
    ev.extra["curves_reference"] = {"volume": CURVES_REFERENCE, "p_target": reference_p}
    return ev


def aggregate(
    model: LoadedModel, plan: Plan, chosen: Sequence[Method | str], done: dict[tuple[str, str, int], dict[str, Any]],
    seeds: Sequence[int], probs: Sequence[dict[str, Any]],
) -> Evaluation:
    """Mean, standard deviation and n of every metric per method, from the per-scan records."""
    ev = Evaluation(model.spec.name, model.spec.version, model.spec.weights_sha256, plan)
    for m in chosen:
        name = m if isinstance(m, str) else m.value
        row: dict[str, dict[str, float]] = {}
        for metric in METRICS:
            group = "randomisation" if metric == "rand_spearman" else "map"
            vals = [
                done[(name, group, s)][metric] for s in seeds[: plan.subset(m, metric)]
                if (name, group, s) in done and metric in done[(name, group, s)]
                # curves made against an earlier reference (a blurred scan) are not comparable
                and (metric not in _CURVE_METRICS or done[(name, group, s)].get("curves_reference") == CURVES_REFERENCE)
            ]
            if vals:
                row[metric] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals)), "n": len(vals)}
        secs = [done[(name, "map", s)]["seconds"] for s in seeds if (name, "map", s) in done]
        if secs:
            row["seconds_per_scan"] = {"mean": float(np.mean(secs)), "sd": float(np.std(secs)), "n": len(secs)}
        rsecs: list[float] = [
            done[(name, "randomisation", s)]["seconds"] for s in seeds
            if (name, "randomisation", s) in done and "seconds" in done[(name, "randomisation", s)]
        ]
        if rsecs:  # wall seconds of the randomisation work per scan: what sizes the randomisation subsets
            row["rand_seconds_per_scan"] = {"mean": float(np.mean(rsecs)), "sd": float(np.std(rsecs)), "n": len(rsecs)}
        cascades = [done[(name, "randomisation", s)]["cascade"] for s in seeds if (name, "randomisation", s) in done]
        if cascades and len(cascades[0]) > 1:
            ev.extra.setdefault("cascade", {})[name] = {
                "+".join(step["randomised"][-1:]): float(np.mean([c[i]["spearman"] for c in cascades]))
                for i, step in enumerate(cascades[0])
            }
        ev.rows[name] = row
    if probs:
        p = np.array([r["p_target"] for r in probs])
        ev.extra["model_on_subset"] = {
            "n": len(p), "sensitivity": float((p > 0.5).mean()), "mean_p_target": float(p.mean()),
            "mask_voxels_median": float(np.median([r["mask_voxels"] for r in probs])),
        }
    return ev


def to_markdown(ev: Evaluation, command: str) -> str:
    """The table as Markdown (what the command prints and writes to docs/)."""
    cols = [("share", "share in mask ↑"), ("rank_acc", "rank acc. ↑"), ("pointing", "pointing ↑"),
            ("deletion_auc", "deletion AUC ↓"), ("insertion_auc", "insertion AUC ↑"),
            ("rand_spearman", "randomised ρ ↓"), ("seconds_per_scan", "s / scan"),
            ("rand_seconds_per_scan", "randomisation s / scan")]
    lines = [
        f"# Attribution evaluation — model `{ev.model}` {ev.model_version}",
        "",
        (f"Generated by `{command}`. Weights SHA-256 `{ev.weights_sha256[:16]}…`. Synthetic held-out positive scans "
        f"(seeds from 1,000,001, odd), target class = the ground-truth class. Each cell: mean ± sd (n scans)."),
        "",
        "| method | " + " | ".join(c[1] for c in cols) + " | sanity |",
        "| --- | " + " | ".join("---" for _ in cols) + " | --- |",
    ]
    for name, row in ev.rows.items():
        cells = []
        for metric, _ in cols:
            v = row.get(metric)
            cells.append(f"{v['mean']:.3f} ± {v['sd']:.3f} ({v['n']})" if v else "—")
        r = row.get("rand_spearman")
        sanity = "—" if name == RANDOM or r is None else ("pass" if r["mean"] < SANITY_THRESHOLD else "**fail**")
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {sanity} |")
    best = max(
        ((n, r["share"]["mean"]) for n, r in ev.rows.items() if n != RANDOM and "share" in r), key=lambda t: t[1],
        default=None,
    )
    lines += ["", "## Reading the table", ""]
    if best:
        lines.append(
            f"- Best localisation: `{best[0]}`, mean share of positive relevance inside the dilated mask "
            f"{best[1]:.3f} (target ≥ 0.6: {'met' if best[1] >= 0.6 else '**not met**'})."
        )
    lines += [
        (f"- share: positive relevance inside the ground-truth mask dilated by {DILATE_VOXELS} voxels "
        f"({2 * DILATE_VOXELS} mm) / all positive relevance. rank acc.: of the K most relevant brain voxels "
        "(K = mask size) the fraction inside the mask. pointing: the most relevant brain voxel lies in the dilated mask."),
        (f"- deletion / insertion: target probability while the most relevant brain voxels are replaced by the "
        f"reference / copied from the scan into the reference, {CURVE_STEPS} steps up to {CURVE_MAX_FRACTION:.0%} of "
        "the brain; area under the curve on [0, 1]. The reference is the MNI152 T1 template on the model grid, the "
        "healthy anatomy the synthetic scans are built from" + (
            f" (the model's probability for it: {ev.extra['curves_reference']['p_target']:.3f})"
            if "curves_reference" in ev.extra else "")
        + ". Insertion starts from a volume the model calls healthy, so it rises only when the inserted voxels carry "
        "the finding; a random map stays near the reference's probability. Deletion leaves the scan's other voxels, "
        "so a map must rank the evidence itself first to lower it; a probability that saturates near 1 keeps it "
        "weak. (Until this version the reference was the scan blurred with σ 8 mm, which the lesion model calls "
        "`lesion`: every insertion AUC was about 0.99, random maps included.)"),
        (f"- randomised ρ: Spearman correlation of |map| between the trained and the fully re-initialised model "
        f"(Adebayo et al. 2018); a method passes the sanity check when ρ < {SANITY_THRESHOLD}."),
        "- `random` is a seeded random map: the chance level.",
        f"- Subsets (first n of the same seed list): {json.dumps(asdict(ev.plan))}.",
    ]
    if "model_on_subset" in ev.extra:
        mo = ev.extra["model_on_subset"]
        lines.append(
            f"- The model on the localisation subset: sensitivity {mo['sensitivity']:.3f} "
            f"(mean p = {mo['mean_p_target']:.3f}, n = {mo['n']}); median mask size {mo['mask_voxels_median']:.0f} voxels."
        )
    if "cascade" in ev.extra:
        lines += ["", "## Cascading randomisation (mean Spearman ρ after randomising down to the layer)", ""]
        steps = list(next(iter(ev.extra["cascade"].values())).keys())
        lines.append("| method | " + " | ".join(f"…{s}" for s in steps) + " |")
        lines.append("| --- | " + " | ".join("---" for _ in steps) + " |")
        for name, casc in ev.extra["cascade"].items():
            lines.append(f"| `{name}` | " + " | ".join(f"{casc.get(s, float('nan')):.3f}" for s in steps) + " |")
    lines += ["", "Default options of every method were used: " + ", ".join(
        f"`{m.value}` {json.dumps({o.name: o.default for o in METHOD_OPTIONS[m]})}" for m in Method if METHOD_OPTIONS[m]
    ) + "."]
    return "\n".join(lines) + "\n"


def to_json(ev: Evaluation) -> dict[str, Any]:
    return {
        "model": ev.model, "model_version": ev.model_version, "weights_sha256": ev.weights_sha256,
        "plan": asdict(ev.plan), "rows": ev.rows, **ev.extra,
        "settings": {"dilate_voxels": DILATE_VOXELS, "curve_steps": CURVE_STEPS,
                     "curve_max_fraction": CURVE_MAX_FRACTION, "sanity_threshold": SANITY_THRESHOLD},
    }


# ---------------------------------------------------------------------------------------------------------------------
# The reviewer's protocol (issue 19): tuned on a validation split, scored on a test split and on a shifted test set.
#
# Seed ranges (neuroexplain/lab/train.py, the bundled specs): validation 3_000_000..3_000_199 (training generator),
# test 1_000_000..1_000_199 (training generator), shift 0..199 of the independent generator
# (neuroexplain.lab.synthetic_shift, its own random stream). Positive scans are the odd seeds of each range.

VALIDATION_SEED_START = 3_000_000
TEST_SEED_START = 1_000_000
SHIFT_SEED_START = 0
SEED_RANGE_SIZE = 200
EPSILON_GRID = (0.01, 1.0, 10.0, 100.0, 1000.0)
PROTOCOL_METHODS: tuple[Method | str, ...] = (RANDOM, *CHEAP)
BOOTSTRAP = 1000


def split_seeds(split: str, n: int) -> list[int]:
    """The first ``n`` positive (odd) seeds of a split: ``validation``, ``test`` or ``shift``.

    Raises:
        InvalidOptionError: an unknown split, or ``n`` beyond the split's 100 positive seeds.
    """
    starts = {"validation": VALIDATION_SEED_START, "test": TEST_SEED_START, "shift": SHIFT_SEED_START}
    if split not in starts:
        raise InvalidOptionError(f"unknown split {split!r}; expected one of {sorted(starts)}", field="split")
    if not 0 < n <= SEED_RANGE_SIZE // 2:
        raise InvalidOptionError(f"{n} scans asked of split {split!r}; 1..{SEED_RANGE_SIZE // 2} allowed", field="n")
    return [starts[split] + 1 + 2 * i for i in range(n)]


def protocol_case(task: Any, split: str, seed: int, dilate: int = DILATE_VOXELS) -> _Case:
    """One positive scan of a split, on the model grid (the shifted generator for ``shift``)."""
    from neuroexplain.lab.synthetic import make_sample
    from neuroexplain.lab.synthetic_shift import make_shifted_sample
    from neuroexplain.volumes import normalise

    s = make_shifted_sample(task, seed) if split == "shift" else make_sample(task, seed)
    x = normalise(s.image)
    brain = x > 0
    mask = s.mask & brain
    return _Case(seed, x, mask, ndimage.binary_dilation(mask, iterations=dilate) & brain, brain)


def chance_levels(mask: np.ndarray, dilated: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """What a map uniform over the brain scores: the mask's share of the brain (undilated and dilated).

    The expected share of relevance, the expected rank accuracy and the probability that a uniformly drawn peak
    falls in the mask are all this fraction; voxels outside the brain do not count (no map puts relevance there).
    """
    n = float(brain.sum())
    if n == 0:
        return {"share": 0.0, "share_dilated": 0.0, "pointing": 0.0, "pointing_dilated": 0.0, "rank_acc": 0.0}
    f, fd = float((mask & brain).sum()) / n, float((dilated & brain).sum()) / n
    return {"share": f, "share_dilated": fd, "pointing": f, "pointing_dilated": fd, "rank_acc": f}


def localisation_both(rel: np.ndarray, c: _Case) -> dict[str, float]:
    """Relevance share and pointing game in the undilated mask and in the dilated one, and rank accuracy."""
    und = localisation(rel, c.mask, c.mask, c.brain)
    dil = localisation(rel, c.mask, c.dilated, c.brain)
    return {"share": und["share"], "share_dilated": dil["share"], "pointing": und["pointing"],
            "pointing_dilated": dil["pointing"], "rank_acc": und["rank_acc"]}


def mean_ci(values: Sequence[float], seed: int = 0) -> dict[str, float]:
    """Mean and a 95 % percentile-bootstrap interval (``BOOTSTRAP`` resamples, seeded)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    idx = np.random.default_rng(seed).integers(0, v.size, (BOOTSTRAP, v.size))
    boots = v[idx].mean(axis=1)
    return {"mean": float(v.mean()), "low": float(np.percentile(boots, 2.5)),
            "high": float(np.percentile(boots, 97.5)), "n": int(v.size)}


def correct_only(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of scans the model classified correctly (``correct`` true)."""
    return [r for r in records if r["correct"]]


def cascade_steps(module: nn.Module) -> list[list[str]]:
    """Cumulative randomisation steps, top layer first: [[top], [top, next], ..., all layers]."""
    order = randomisation_order(module)
    return [order[: i + 1] for i in range(len(order))]


def _protocol_maps(module: nn.Module, model: LoadedModel, cases: Sequence[_Case], method: Method | str, target: int,
                   options: dict[str, Any] | None = None) -> list[np.ndarray]:
    if method == RANDOM:
        return [_random_map(c.seed, c.x.shape) for c in cases]
    m = Method(method)
    opts = parse_options(m, options)
    x = torch.from_numpy(np.stack([c.x for c in cases]))[:, None]  # (B, 1, D, H, W)
    out = attribute_tensor(private_copy(module, m), x, m, target, opts, grid=model.spec.grid,
                           layer_names=[layer.name for layer in model.spec.layers])
    return [a[0].numpy() for a in out]


def tune_epsilon(model: LoadedModel, task: Any, seeds: Sequence[int], log: Callable[[str], None] = print,
                 grid: Sequence[float] = EPSILON_GRID) -> dict[str, Any]:
    """Choose lrp_epsilon's ε on validation scans: the largest mean relevance share in the undilated mask."""
    target = len(model.spec.classes) - 1
    cases = [protocol_case(task, "validation", s) for s in seeds]
    scores: dict[str, float] = {}
    for eps in grid:
        vals = []
        for i in range(0, len(cases), 4):
            block = cases[i : i + 4]
            for c, rel in zip(block, _protocol_maps(model.module, model, block, Method.LRP_EPSILON, target,
                                                    {"epsilon": eps})):
                vals.append(localisation_both(rel, c)["share"])
        scores[repr(eps)] = float(np.mean(vals))
        log(f"validation: lrp_epsilon epsilon={eps}: share {scores[repr(eps)]:.3f} (n={len(vals)})")
    best = max(grid, key=lambda e: scores[repr(e)])
    return {"chosen": best, "criterion": "mean share of positive relevance in the undilated mask",
            "scores": scores, "seeds": list(seeds)}


def score_split(model: LoadedModel, task: Any, split: str, seeds: Sequence[int], options: dict[str, dict[str, Any]],
                cascade_n: int, methods: Sequence[Method | str] = PROTOCOL_METHODS,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Per-scan localisation of every method on a split, the model's answer, and the layer-by-layer cascade."""
    target = len(model.spec.classes) - 1
    module = model.module
    cases = [protocol_case(task, split, s) for s in seeds]
    records: dict[str, list[dict[str, Any]]] = {(m if isinstance(m, str) else m.value): [] for m in methods}
    probs = target_probability(module, np.stack([c.x for c in cases]), target)
    chance = [chance_levels(c.mask, c.dilated, c.brain) for c in cases]
    for m in methods:
        name = m if isinstance(m, str) else m.value
        for i in range(0, len(cases), 4):
            block = cases[i : i + 4]
            for j, (c, rel) in enumerate(zip(block, _protocol_maps(module, model, block, m, target, options.get(name)))):
                p = probs[i + j]
                records[name].append({"seed": c.seed, "p_target": p, "correct": p > 0.5, **localisation_both(rel, c)})
        log(f"{split}: {name} on {len(cases)} scans")
    steps = cascade_steps(module)
    cascade: dict[str, list[list[float]]] = {}
    for m in [m for m in methods if m != RANDOM]:
        name = m.value if isinstance(m, Method) else m
        per_scan = []
        for c in cases[:cascade_n]:
            trained = _protocol_maps(module, model, [c], m, target, options.get(name))[0]
            row = []
            for names in steps:
                rnd = private_copy(module)
                randomise(rnd, names, seed=c.seed)
                row.append(spearman_abs(trained, _protocol_maps(rnd, model, [c], m, target, options.get(name))[0],
                                        c.brain))
            per_scan.append(row)
        cascade[name] = per_scan
        log(f"{split}: {name} cascade on {min(cascade_n, len(cases))} scans")
    return {"split": split, "seeds": list(seeds), "records": records, "chance": chance,
            "cascade_steps": [s[-1] for s in steps], "cascade": cascade}


_PROTOCOL_METRICS = ("share", "share_dilated", "pointing", "pointing_dilated", "rank_acc")


def summarise_split(raw: dict[str, Any]) -> dict[str, Any]:
    """Means with 95 % bootstrap intervals, on all scans and on correctly classified scans, plus chance levels."""
    out: dict[str, Any] = {"split": raw["split"], "n_scans": len(raw["seeds"]), "seeds": raw["seeds"], "rows": {}}
    for name, recs in raw["records"].items():
        out["rows"][name] = {
            subset: {k: mean_ci([r[k] for r in rs]) for k in _PROTOCOL_METRICS}
            for subset, rs in (("all", recs), ("correct", correct_only(recs)))
        }
    first = next(iter(raw["records"].values()))
    out["accuracy"] = mean_ci([float(r["correct"]) for r in first])
    out["chance"] = {k: mean_ci([c[k] for c in raw["chance"]]) for k in _PROTOCOL_METRICS}
    out["cascade"] = {
        name: {step: float(np.mean([row[i] for row in rows])) for i, step in enumerate(raw["cascade_steps"])}
        for name, rows in raw["cascade"].items() if rows
    }
    out["cascade_n"] = max((len(rows) for rows in raw["cascade"].values()), default=0)
    out["cascade_order"] = raw["cascade_steps"]
    return out


def run_protocol(model: LoadedModel, *, validation_n: int = 12, test_n: int = 30, shift_n: int = 30,
                 cascade_n: int = 3, methods: Sequence[Method | str] = PROTOCOL_METHODS,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune on validation, score on test and on the shifted test set; the drop is shift minus test."""
    task = _task_of(model)
    t0 = time.monotonic()
    tuning = tune_epsilon(model, task, split_seeds("validation", validation_n), log)
    options = {Method.LRP_EPSILON.value: {"epsilon": tuning["chosen"]}}
    test = summarise_split(score_split(model, task, "test", split_seeds("test", test_n), options, cascade_n, methods, log))
    shift = summarise_split(score_split(model, task, "shift", split_seeds("shift", shift_n), options, cascade_n,
                                        methods, log))
    drop = {name: {k: shift["rows"][name]["all"][k]["mean"] - test["rows"][name]["all"][k]["mean"]
                   for k in _PROTOCOL_METRICS} for name in test["rows"]}
    return {"model": model.spec.name, "model_version": model.spec.version, "weights_sha256": model.spec.weights_sha256,
            "tuning": {"lrp_epsilon": tuning}, "test": test, "shift": shift, "drop_shift_minus_test": drop,
            "settings": {"dilate_voxels": DILATE_VOXELS, "dilate_mm": 2 * DILATE_VOXELS, "bootstrap": BOOTSTRAP,
                         "brain": "normalised input > 0 (the skull-stripped head of each scan)"},
            "seconds": time.monotonic() - t0}


def _span(s: dict[str, Any]) -> str:
    return f"{s['seeds'][0]}..{s['seeds'][-1]}"


def _cell(v: dict[str, float]) -> str:
    return "—" if not v["n"] else f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"


def protocol_markdown(res: dict[str, Any], command: str) -> str:
    """The protocol's tables as Markdown."""
    d = res["settings"]["dilate_voxels"]
    t = res["tuning"]["lrp_epsilon"]
    lines = [
        (f"# Attribution evaluation (validation-tuned, test and shifted test) — model `{res['model']}` "
        f"{res['model_version']}"), "",
        (f"Generated by `{command}` ({res['seconds']:.0f} s). Weights SHA-256 `{res['weights_sha256'][:16]}…`. "
        "Each cell: mean [95 % bootstrap interval] over positive scans; target class = the ground-truth class."), "",
        (f"- **Tuning (validation split, seeds {t['seeds'][0]}..{t['seeds'][-1]} odd, n = {len(t['seeds'])})**: "
        f"lrp_epsilon's ε chosen from {list(EPSILON_GRID)} by {t['criterion']}: ε = {t['chosen']} "
        f"(scores {', '.join(f'{k}: {v:.3f}' for k, v in t['scores'].items())}). Every other method uses its "
        "documented defaults (no tuning)."),
        (f"- **Test split**: seeds {_span(res['test'])} odd of the training generator (n = {res['test']['n_scans']}); "
        f"**shifted test set**: seeds {_span(res['shift'])} odd of `neuroexplain.lab.synthetic_shift` "
        f"(n = {res['shift']['n_scans']}); neither was used for tuning."),
        (f"- share: positive relevance in the mask / all positive relevance; pointing: the most relevant brain voxel is "
        f"in the mask. \"undilated\" = the ground-truth mask itself; \"dilated {d}\" = the mask dilated by {d} voxels "
        f"({2 * d} mm), clipped to the brain. rank acc.: of the K most relevant brain voxels (K = mask size), the "
        "fraction in the undilated mask."),
        ("- chance (inside the brain): the mask's share of the brain's voxels, per scan, averaged: what a map uniform "
        "over the brain scores on share, rank accuracy and pointing. The `random` row is a seeded random map."),
        ("- all = every positive scan; correct = the positive scans the model calls positive (p > 0.5). The pointing "
        "game on all scans also measures the model; on correct scans, the method."), "",
    ]
    for key, title in (("test", "Test split"), ("shift", "Shifted test set")):
        s = res[key]
        lines += [f"## {title} (model accuracy on these positives: {_cell(s['accuracy'])})", "",
                  "| method | scans | share undilated | share dilated " + str(d) + " | pointing undilated | pointing "
                  "dilated " + str(d) + " | rank acc. |", "| --- | --- | --- | --- | --- | --- | --- |"]
        lines.append("| chance (brain) | all | " + " | ".join(_cell(s["chance"][k]) for k in _PROTOCOL_METRICS) + " |")
        for name, row in s["rows"].items():
            for subset in ("all", "correct"):
                r = row[subset]
                lines.append(f"| `{name}` | {subset} (n={r['share']['n']}) | "
                             + " | ".join(_cell(r[k]) for k in _PROTOCOL_METRICS) + " |")
        lines.append("")
    lines += ["## Drop on the shifted set (shift − test, all scans, means)", "",
              "| method | share undilated | share dilated | pointing undilated | pointing dilated | rank acc. |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, dr in res["drop_shift_minus_test"].items():
        lines.append(f"| `{name}` | " + " | ".join(f"{dr[k]:+.3f}" for k in _PROTOCOL_METRICS) + " |")
    for key, title in (("test", "test split"), ("shift", "shifted test set")):
        s = res[key]
        if not s["cascade"]:
            continue
        steps = s["cascade_order"]
        lines += ["", f"## Cascading randomisation, {title} (Adebayo et al. 2018; n = {s['cascade_n']} scans)", "",
                  ("Mean Spearman ρ of |map| (brain voxels) between the trained model and the model with the layers "
                  "up to and including the column's re-initialised, top layer first, cumulative."), "",
                  "| method | " + " | ".join(f"+{x}" for x in steps) + " |", "| --- | " + " | ".join("---" for _ in steps) + " |"]
        for name, casc in s["cascade"].items():
            lines.append(f"| `{name}` | " + " | ".join(f"{casc[x]:.3f}" for x in steps) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m neuroexplain.lab.evaluate_attribution --model lesion`` (the protocol; docs/attribution-protocol-*)."""
    import argparse
    import shlex
    import sys

    from neuroexplain.models import load_model

    p = argparse.ArgumentParser(prog="python -m neuroexplain.lab.evaluate_attribution")
    p.add_argument("--model", required=True)
    p.add_argument("--validation-scans", type=int, default=12)
    p.add_argument("--test-scans", type=int, default=30)
    p.add_argument("--shift-scans", type=int, default=30)
    p.add_argument("--cascade-scans", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    try:
        model = load_model(args.model)
        res = run_protocol(model, validation_n=args.validation_scans, test_n=args.test_scans,
                           shift_n=args.shift_scans, cascade_n=args.cascade_scans,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    except InvalidOptionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m neuroexplain.lab.evaluate_attribution " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"attribution-protocol-{model.spec.name}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    table = protocol_markdown(res, command)
    stem.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
