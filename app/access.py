"""What a demo visitor may make the server open: zoo names always; local folders by where the server listens.

On loopback (the default, 127.0.0.1) only this machine's own user reaches the page, so any local pipeline folder
may be typed in. On any other address, local folders are accepted only under ``--models-dir DIR``: the typed path
is resolved (``..`` and symbolic links followed) and must stay inside DIR, hub ids from the local cache are
refused, and messages never say whether a path outside DIR exists. Pipelines are always loaded from safetensors
weights with no custom or remote code (see `check_no_custom_code`).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError

#: libraries a pipeline folder's components may come from (no module files of the folder itself)
COMPONENT_LIBRARIES = ("diffusers", "transformers")
MAX_NAME_CHARS = 1024


def is_loopback(host: str) -> bool:
    """True when `host` (a name or an address) only accepts connections from this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


@dataclass(frozen=True)
class LocalAccess:
    """The server's rule for local paths. `anywhere`: any folder (loopback); else only under `models_dir`."""

    anywhere: bool = True
    models_dir: Path | None = None

    @classmethod
    def for_host(cls, host: str, models_dir: str | Path | None = None) -> LocalAccess:
        root = Path(models_dir).expanduser().resolve() if models_dir else None
        if root is not None and not root.is_dir():
            raise InputError(f"--models-dir {models_dir} is not a folder")
        return cls(anywhere=is_loopback(host) and root is None, models_dir=root)

    @property
    def restricted(self) -> bool:
        return not self.anywhere

    def describe(self) -> str:
        if self.anywhere:
            return "any local pipeline folder"
        return "pipeline folders under the models folder" if self.models_dir else "zoo pipelines only"

    def folder(self, name: str) -> Path:
        """The resolved local folder `name` may open, or `InputError` with a message that reveals nothing
        outside the models folder."""
        if len(name) > MAX_NAME_CHARS:
            raise InputError(f"model name is longer than {MAX_NAME_CHARS} characters")
        if self.anywhere:
            return Path(name).expanduser()
        if self.models_dir is None:
            raise InputError(f"model {name!r} is not a zoo pipeline; this server accepts zoo pipelines only (its "
                             "operator can serve local pipelines with --models-dir)")
        typed = Path(name)
        candidate = typed if typed.is_absolute() else self.models_dir / typed
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):  # a symlink loop, an unreadable path
            resolved = None
        if resolved is None or not resolved.is_relative_to(self.models_dir) or not resolved.is_dir():
            raise InputError(f"model {name!r} is not a zoo pipeline nor a pipeline folder in the models folder")
        return resolved

    def shown(self, path: Path) -> str:
        """How a path appears in messages: relative to the models folder when restricted."""
        if self.restricted and self.models_dir is not None and path.is_relative_to(self.models_dir):
            return str(path.relative_to(self.models_dir)) or "."
        return str(path)


def check_no_custom_code(path: Path, families: dict[str, str], shown: str) -> str:
    """Refuse a folder whose `model_index.json` names an unsupported pipeline or components that are not stock
    diffusers/transformers classes (custom code would run on load). Returns the pipeline class name."""
    import diffusers
    import transformers

    index = path / "model_index.json"
    if not index.is_file():
        raise InputError(f"{shown!r} is not a diffusers pipeline folder: it has no model_index.json (a pipeline "
                         "folder is what pipe.save_pretrained(folder) writes; a single model's folder is not enough)")
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{shown}/model_index.json is not valid JSON") from exc
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls not in families:
        raise InputError(f"{shown!r} holds a {cls!r}; the demo supports {', '.join(families)}")
    libraries = {"diffusers": diffusers, "transformers": transformers}
    for key, value in config.items():
        if key.startswith("_") or value is None or value == [None, None]:
            continue
        ok = (isinstance(value, list) and len(value) == 2 and value[0] in COMPONENT_LIBRARIES
              and isinstance(value[1], str) and hasattr(libraries[value[0]], value[1]))
        if not ok and not isinstance(value, (bool, int, float, str, dict)):
            raise InputError(f"{shown!r}: component {key!r} = {value!r} is not a stock diffusers/transformers class; "
                             "the demo never runs code shipped inside a model folder")
    return cls
