"""Model and tokenizer names -> local directories, resolved as vLLM resolves them.

A directory is used as it is and a preset name stays a preset; anything else is a Hugging Face hub
id (`nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8`), fetched with huggingface_hub: from the local
cache (`HF_HOME`, `HF_HUB_CACHE`, or `--download-dir`) when it is there, downloaded with a progress
bar when the hub can be reached, never contacted with `HF_HUB_OFFLINE=1`. Only the files serving
needs are fetched (config, tokenizer, chat template, and the safetensors weights unless the weights
are not loaded). Called by the `serve` and `generate` commands and the benchmark client, before
anything starts, so a name that cannot be resolved is one clear error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from hybridserve.config import PRESETS_DIR

logger = logging.getLogger("hybridserve.hub")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CONFIG_FILES = ["*.json", "*.jinja", "tokenizer*", "*.txt", "*.model"]
WEIGHT_FILES = ["*.safetensors"]


@dataclass(frozen=True)
class HubOptions:
    """Where hub models come from (flags of `serve` and `generate`)."""

    revision: str | None = None  # branch, tag or commit of a hub model (default: main)
    download_dir: str | None = None  # Hugging Face cache directory to read and download into (default: HF_HUB_CACHE)


class ModelNotFoundError(ValueError):
    """A name that is no directory, no preset and no hub model we can get; the message says why."""


def is_preset(name: str) -> bool:
    return (PRESETS_DIR / name / "config.json").is_file()


def is_hub_id(name: str) -> bool:
    """`org/name` or `name`, not something that is meant as a path (`/x`, `./x`, `~/x`, `a/b/c`)."""
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def resolve(name: str, options: HubOptions = HubOptions(), *, weights: bool = True) -> str:
    """A local directory or preset name for `name`; downloads hub files when needed and allowed."""
    path = Path(name).expanduser()
    if path.is_dir() or is_preset(name):
        return str(path) if path.is_dir() else name
    if not is_hub_id(name):
        raise ModelNotFoundError(f"{name}: no such directory")
    return _snapshot(name, options, weights)


def _snapshot(repo_id: str, options: HubOptions, weights: bool) -> str:
    import huggingface_hub
    from huggingface_hub import constants, errors

    cache = options.download_dir or constants.HF_HUB_CACHE
    offline = constants.HF_HUB_OFFLINE
    logger.info("%s: a Hugging Face hub id; looking in %s%s", repo_id, cache,
                " (HF_HUB_OFFLINE: the hub is not contacted)" if offline else ", downloading what is missing")
    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=options.revision, cache_dir=options.download_dir,
            allow_patterns=CONFIG_FILES + (WEIGHT_FILES if weights else []))
    except errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: the hub has no revision {options.revision!r}") from None
    except errors.GatedRepoError:
        raise ModelNotFoundError(f"{repo_id}: a gated model; accept its terms on the hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: not a directory, not a preset (presets: {_presets()}), and no such "
                                 "model on the Hugging Face hub (or it is private: set HF_TOKEN)") from None
    except errors.HfHubHTTPError as e:
        raise ModelNotFoundError(f"{repo_id}: the Hugging Face hub answered {e}") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
        revision = f" at revision {options.revision!r}" if options.revision else ""
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub could not be reached ({type(e).__name__})"
        raise ModelNotFoundError(f"{repo_id}: not a directory, not a preset (presets: {_presets()}), and not in "
                                 f"the Hugging Face cache at {cache}{revision}; {why}") from None


def _presets() -> str:
    return ", ".join(sorted(p.parent.name for p in PRESETS_DIR.glob("*/config.json")))
