"""SVLM: a small vision-language model you train yourself."""

import os

# OpenMP's default busy-waiting makes torch many times slower on a small CPU
# shared with another process (measured 12x on 2 cores); wait passively.
# This must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """${svlm_suffix:x}: "_x", or "" when x is null (run folder names: <time>_<run_name>)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("svlm_suffix"):
        OmegaConf.register_new_resolver("svlm_suffix", lambda x: f"_{x}" if x else "")


_register_resolvers()
