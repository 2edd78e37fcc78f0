"""Source Matters compendium: shortcut learning under confounders, by pretraining source."""

from . import numerics

# First, before anything loads numpy or torch: the same vector kernels on every x86-64 CPU
# (sm_utils.numerics; SM_NUMERICS=native turns it off).
numerics.pin()
