"""Source Matters compendium: shortcut learning under confounders, by pretraining source."""

from . import numerics

# First, before anything loads numpy or torch: the same vector kernels on every x86-64 CPU
# (sm_utils.numerics; SM_NUMERICS=native turns it off).
numerics.pin()

# tqdm.auto, imported by timm's hub code, warns in every Jupyter kernel without ipywidgets that
# it cannot draw widget bars; this package draws none there (sm_utils.progress), so the warning
# says nothing to a reader of a notebook.
import warnings as _warnings

_warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")
