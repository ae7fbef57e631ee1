"""SVLM: a small vision-language model you train yourself."""

from svlm.openmp import apply_wait_policy

# How torch's threads wait (svlm/openmp.py): read by libgomp when torch loads,
# so set before anything imports torch.
WAIT_POLICY = apply_wait_policy()

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """${svlm_suffix:x}: "_x", or "" when x is null (run folder names: <time>_<run_name>)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("svlm_suffix"):
        OmegaConf.register_new_resolver("svlm_suffix", lambda x: f"_{x}" if x else "")


_register_resolvers()
