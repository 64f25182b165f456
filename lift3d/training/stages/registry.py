"""Training stages, a registered kind: ``STAGES`` maps a name (``run.stage``) to a ``Stage`` subclass,
which carries the whole contract of one training phase.

A built-in stage registers from its own module in this package (``@STAGES.register("slices")``); a plugin
registers one through the hook ``lift3d_register_stages``. The loop, the memory check, the config and the
command line ask the stage, and never branch on its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

from lift3d.plugins.registry import PluginError, Registry
from lift3d.training.sections import SHARED

STAGES: Registry[Any] = Registry(
    "stages", doc="one phase of training: its options, models, data view, memory estimate and export label "
                  "(lift3d.training.stages.Stage)")


class Stage:
    """One training phase. Subclass it, set the class attributes, implement ``prepare`` (and usually
    ``view`` and ``memory``), and register the class: ``@STAGES.register("name")``.

    The one loop (``lift3d.training.loop.train``) runs every stage: it checks the config
    (``check``, and that no option the stage ignores is set), the memory (``memory``), then calls
    ``prepare`` before the run folder is touched, and trains the ``Task``
    that ``prepare``'s ``make_task(accelerator)`` returns.
    """

    #: One line saying what the stage trains (``--run.stage``'s help, ``lift3d plugins``, the docs' table).
    summary: ClassVar[str] = ""
    #: The name of the config section of the stage's own options (``[vae]``, ``[lift]``...), or None.
    section: ClassVar[str | None] = None
    #: The dataclass of that section: fields made with ``lift3d.training.options.opt``.
    options: ClassVar[type | None] = None
    #: What the exported model's settings call the stage that wrote it (the export's ``stage``).
    export_label: ClassVar[str] = ""
    #: The shared sections (``lift3d.training.sections.SHARED``) the stage reads. An option of any other
    #: section (another stage's own included) set to a value other than its default is refused, naming the stage.
    reads: ClassVar[tuple[str, ...]] = SHARED
    #: Options of the sections it reads that it ignores all the same (``"data.window"``): refused likewise.
    ignores: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def own(self, cfg: Any) -> Any:
        """This stage's own section of ``cfg`` (``cfg.vae`` for the autoencoder stage), or None."""
        return None if self.section is None else getattr(cfg, self.section)

    def check(self, cfg: Any) -> None:
        """Refuse options that do not fit together in this stage, beyond each option's own rule (one line,
        ``ConfigError``). ``lift3d.training.config.validate`` calls it."""

    def view(self, cfg: Any, dataset: Any) -> Any:
        """The stage's data view of the training ``dataset``: slices, whole volumes, windows..."""
        raise NotImplementedError(f"stage {self.name!r} ({type(self).__name__}) has no data view")

    def memory(self, cfg: Any) -> tuple[int, int, str] | None:
        """``(weight bytes, trained weight bytes, description)`` of the model the stage would build, measured
        without allocating it (torch's meta device), for ``lift3d.training.memory.check_memory``; it may
        also refuse what is too large to build at all. None: nothing to measure before the model is read."""
        return None

    def prepare(self, cfg: Any, dataset: Any, output_dir: Path) -> Callable[[Any], Any]:
        """Build and check the stage's models and data before the run folder is touched; return
        ``make_task(accelerator)``, which gives the loop its ``Task``."""
        raise NotImplementedError(f"stage {self.name!r} ({type(self).__name__}) does not implement prepare")

    def validation_summary(self, best: Any, first: dict[str, float] | None) -> str:
        """What the run says at its end about its sampled validation (``best``: a
        ``Best``; ``first``: the scores at step 0)."""
        from lift3d.training.validation import summary_line

        return summary_line(best)


def get_stage(name: str) -> Stage:
    """The stage registered as ``name``; an unknown name lists the registered ones."""
    found = STAGES.get(name)
    if not (isinstance(found, type) and issubclass(found, Stage)):
        entry = STAGES.entry(name)
        raise PluginError(f"stage {name!r} (registered by {entry.plugin}) must be a subclass of "
                          f"lift3d.training.stages.Stage, got {found!r}")
    return found(name)


def stages() -> list[Stage]:
    """Every registered stage, by name (plugins included)."""
    return [get_stage(name) for name in STAGES.names()]
