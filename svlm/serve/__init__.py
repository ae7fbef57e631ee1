"""An OpenAI-compatible chat server for a trained model, with a web page:
`python -m svlm.serve ckpt=<model folder>` (conf/serve.yaml; README: Serve).

    config.py    the settings and limits
    messages.py  an OpenAI chat request -> our chat template's turns, images, sampling settings
    engine.py    the worker thread that decodes requests together (continuous batching), its bounded queue
    app.py       the Starlette app: routes, server-sent events, OpenAI error JSON
    static/      the web page served at /
"""

from svlm.serve.config import ServeConfig, load_serve_config

__all__ = ["ServeConfig", "load_serve_config", "build_app"]


def build_app(cfg: ServeConfig):
    """Load the model cfg.ckpt names and return (the Starlette app, the model folder)."""
    from svlm.hardware import pick_device
    from svlm.model_folder import load_model, resolve_model
    from svlm.serve.app import create_app, default_hosts
    from svlm.serve.engine import Engine

    folder = resolve_model(cfg.ckpt, cfg.paths.outputs)
    device = pick_device(cfg.hardware)
    model, tokenizer, meta = load_model(folder, device)
    engine = Engine(model, tokenizer, device, cfg.hardware, cfg.serve, folder=folder, meta=meta)
    return create_app(engine, cfg.model_name, default_hosts(cfg.host, cfg.serve.allowed_hosts)), folder
