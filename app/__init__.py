"""The Gradio demo: baseline vs accelerated, side by side, measured (`diffaccel app`).

`app.runner` holds the generation logic (no UI: `DemoRunner.run(RunRequest) -> RunResult`); `app.ui` builds the
Blocks (`build_app`, `launch`). gradio is imported only by `app.ui`, so the runner works without the app extra.
"""

from .runner import DemoRunner, RunInputError, RunRequest, RunResult, SideResult

__all__ = ["DemoRunner", "RunInputError", "RunRequest", "RunResult", "SideResult", "build_app", "launch"]


def __getattr__(name: str):
    if name in ("build_app", "launch"):
        from . import ui

        return getattr(ui, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
