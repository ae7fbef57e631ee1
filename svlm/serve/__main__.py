"""`python -m svlm.serve [ckpt=...] [port=8000] [serve.image_root=...]` (see conf/serve.yaml)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import svlm  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from svlm.cli import quote_free_text

CONF = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(config_path=CONF, config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import logging

    import uvicorn

    from svlm.data.formats import DataError
    from svlm.errors import ConfigError
    from svlm.serve import build_app, load_serve_config

    try:
        serve_cfg = load_serve_config(cfg)
        app, folder = build_app(serve_cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    where = f"http://{serve_cfg.host}:{serve_cfg.port}"
    logging.getLogger("svlm.serve").info(
        "serving %s as %r: web page %s/ , API %s/v1", folder, serve_cfg.model_name, where, where
    )
    # log_config=None: uvicorn's loggers go through the logging Hydra set up (console and the run folder's log)
    try:
        uvicorn.run(app, host=serve_cfg.host, port=serve_cfg.port, log_config=None, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down cleanly; some versions raise it again after
        pass


if __name__ == "__main__":
    sys.argv = quote_free_text(sys.argv, ("ckpt", "serve.image_root", "model_name"))
    main()
