"""Recipes: named sets of defaults that fit a training schedule, shared by ``extract`` and ``train-heads``.

One table, name -> settings. A recipe fills in only what the user did not give: an explicit
``--scale-range``, ``--warmup-steps`` or ``--box-convs``/``--box-fcs`` always wins. The choice is
recorded in the store header (``recipe``) and in the run's config.json (``train.recipe``);
``train-heads --cache`` takes the store's recipe unless ``--recipe`` is given.
Both recipes warm up linearly for min(1000 steps, 5% of the run) and decay in steps (x0.1 at 2/3
and 8/9 of the run); the schedule's length (``--epochs``) is the user's.

  short  (default) mild jitter 0.8-1.25 and torchvision's 2-FC box head: the winners of
         ``benchmarks/recipe_study.py`` (results in benchmarks/results/recipe_study.md; docs/recipes.md
         states the rule they follow).
  paper  Vasconcelos et al. 2022 (and the TF Model Garden configs it builds on): LSJ 0.1-2.0, the
         4conv1fc Faster R-CNN box head of Table 3, step decay; meant for hundreds of epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cachedet.core.errors import CachedetError

DEFAULT_CANVAS = (
    640  # side of the square canvas, pixels, wherever one is made (extract, --online, bench)
)
WARMUP_SHARE = 0.05  # warm-up: this share of the run ...
WARMUP_CAP = 1000  # ... but never more than this many steps
LEGACY_SCALE_RANGE = (0.1, 2.0)  # what runs recorded before recipes used


@dataclass(frozen=True)
class Recipe:
    name: str
    scale_range: tuple[float, float]  # LSJ: the longer side is f x size, f ~ U(scale_range)
    detector_options: dict = field(
        default_factory=dict
    )  # box head (faster-rcnn; cascade keeps its own)
    long_epochs: int = (
        0  # the schedule the jitter is meant for: fewer epochs is short for it (0: any)
    )


RECIPES = {
    "short": Recipe("short", (0.8, 1.25), {"box_convs": 0, "box_fcs": 2}),
    "paper": Recipe("paper", (0.1, 2.0), {"box_convs": 4, "box_fcs": 1}, long_epochs=100),
}
DEFAULT_RECIPE = "short"


def get_recipe(name: str | None) -> Recipe:
    """The recipe called ``name`` (None: the default). Raises CachedetError naming --recipe if unknown."""
    name = DEFAULT_RECIPE if name is None else name
    if name not in RECIPES:
        raise CachedetError(f"TrainConfig.recipe {name}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name]


def warmup_steps_for(total_steps: int) -> int:
    """Linear warm-up length (steps) of a run of ``total_steps``: min(1000, 5% of the run), at least 1."""
    return max(1, min(WARMUP_CAP, round(WARMUP_SHARE * total_steps)))


def detector_options_for(recipe: Recipe, head: str, given: dict) -> dict:
    """``given`` detector options with the recipe's box head filled in for a faster-rcnn head
    (the cascade keeps its paper 0/2 head, retinanet has none); the user's box_convs/box_fcs win."""
    if head != "faster-rcnn":
        return dict(given)
    return {**recipe.detector_options, **given}


def schedule_advice(
    scale_range: tuple[float, float],
    epochs: int | None = None,
    views: int | None = None,
    field: str = "recipe",
) -> str | None:
    """One line when the jitter range is wide for the schedule (the paper's range on a schedule far
    shorter than the paper's), suggesting the short recipe (set by the config field ``field``); None
    when the pairing is fine.

    ``epochs`` is the training length (train-heads); ``views`` the cached views per image (extract),
    each of which a short run sees only a few times."""
    lo, hi = scale_range
    if hi / lo < 4:  # 0.5-1.5 (3x) and milder ranges suit short runs
        return None
    paper = RECIPES["paper"]
    if epochs is not None and epochs < paper.long_epochs:
        return (
            f"LSJ {lo:g}-{hi:g} is the paper's range for ~{paper.long_epochs}+ epochs; "
            f"for {epochs} epochs try {field} short (LSJ 0.8-1.25; docs/recipes.md)"
        )
    if epochs is None and views is not None and views < paper.long_epochs:
        return (
            f"LSJ {lo:g}-{hi:g} is the paper's range for ~{paper.long_epochs}+ epochs of fresh views; "
            f"for short runs on {views} cached views per image use {field} short (LSJ 0.8-1.25)"
        )
    return None


def train_recipe(given: str | None, header) -> tuple[str, str | None]:
    """The recipe a train-heads run uses: ``given`` (``TrainConfig.recipe``), else the store's, else
    the default; and a one-line note when the given recipe differs from the store's (None otherwise)."""
    stored = header.recipe if header is not None else None  # a StoreHeader
    if given is None:
        return get_recipe(stored if stored in RECIPES else None).name, None
    get_recipe(given)
    if stored is not None and stored != given:
        note = (
            f"TrainConfig.recipe {given}: the cache was extracted with recipe {stored}; "
            "its views keep that jitter"
        )
        return given, note
    return given, None
