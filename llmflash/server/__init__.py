"""`llmflash serve`: an OpenAI-compatible HTTP server over one loaded model (docs/SERVE.md).

`create_app(model, model_name)` (in app.py) returns the ASGI app; imports of Starlette, uvicorn and
pydantic stay inside this package so that the CLI parses arguments without them.
"""
