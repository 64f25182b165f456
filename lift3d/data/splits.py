"""Train / val / test splits of a dataset's subjects: explicit lists, or seeded sizes.

Sizes follow scikit-learn's ``train_test_split``: an int is a count, a float in [0, 1) a fraction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

SPLITS = ("train", "val", "test", "all")

SubjectList = str | Iterable[str] | None


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return split


def _names(value: SubjectList) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _count(size: int | float, n: int, name: str, where: object) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be an int (a count) or a float in [0, 1) (a fraction), got {size!r}")
    if isinstance(size, (float, np.floating)):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{name} as a fraction must be in [0, 1), got {size}")
        return int(round(size * n))
    if not 0 <= size <= n:
        raise ValueError(f"{where}: {name}={size} is more than the {n} subjects available")
    return int(size)


def split_subjects(
    subjects: Sequence[str],
    *,
    train: SubjectList = None,
    val: SubjectList = None,
    test: SubjectList = None,
    test_size: int | float = 0.2,
    val_size: int | float = 0,
    seed: int = 0,
    shuffle: bool = True,
    where: object = "dataset",
) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...], "all": [...]}``, each in ``subjects`` order.

    With any of ``train``/``val``/``test`` given (lists, or comma-separated strings) the split is
    explicit: a missing ``train`` gets every subject not listed elsewhere; a missing ``test`` too,
    when ``train`` is given. Otherwise ``test_size`` and ``val_size`` subjects are drawn with
    ``seed`` (or, with ``shuffle=False``, taken from the end: train, then val, then test).
    """
    subjects = list(subjects)
    lists = {"train": _names(train), "val": _names(val), "test": _names(test)}
    if any(v is not None for v in lists.values()):
        known = set(subjects)
        for name, names in lists.items():
            unknown = [s for s in names or [] if s not in known]
            if unknown:
                shown = ", ".join(subjects[:10]) + (", ..." if len(subjects) > 10 else "")
                raise ValueError(f"{where}: unknown subjects in {name}: {', '.join(unknown)}; available: {shown}")
        given = [(k, set(v)) for k, v in lists.items() if v is not None]
        for i, (a, sa) in enumerate(given):
            for b, sb in given[i + 1:]:
                if sa & sb:
                    raise ValueError(f"{where}: subjects in both {a} and {b}: {', '.join(sorted(sa & sb))}")
        listed = set().union(*(s for _, s in given))
        rest = [s for s in subjects if s not in listed]
        if lists["train"] is None:
            lists["train"] = rest
        elif lists["test"] is None:
            lists["test"] = rest
        chosen = {k: set(v or []) for k, v in lists.items()}
    else:
        n = len(subjects)
        n_test, n_val = _count(test_size, n, "test_size", where), _count(val_size, n, "val_size", where)
        if n_test + n_val > n:
            raise ValueError(f"{where}: test_size={test_size} and val_size={val_size} ask for more than the {n} subjects")
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)[::-1]
        picked_test = [subjects[i] for i in order[:n_test]]
        picked_val = [subjects[i] for i in order[n_test:n_test + n_val]]
        chosen = {"test": set(picked_test), "val": set(picked_val)}
        chosen["train"] = set(subjects) - chosen["test"] - chosen["val"]
    out = {k: [s for s in subjects if s in chosen[k]] for k in ("train", "val", "test")}
    out["all"] = list(subjects)
    return out


def select_split(subjects: Sequence[str], split: str, **options) -> list[str]:
    """The subjects of ``split`` (see ``split_subjects``); an empty split is an error.

    ``split="all"`` is every subject, whatever the split options say.
    """
    if check_split(split) == "all":
        chosen = list(subjects)
    else:
        chosen = split_subjects(subjects, **options)[split]
    if not chosen:
        where = options.get("where", "dataset")
        raise ValueError(
            f"{where}: the {split!r} split is empty ({len(subjects)} subjects; "
            f"set test_size/val_size or the train/val/test lists)"
        )
    return chosen
