"""Model names as users type them: a local folder, or a Hugging Face Hub id.

``resolve("meta-llama/Llama-3.2-1B")`` downloads (or, offline, finds) the
model's files in huggingface_hub's standard cache and returns that folder;
``--revision``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and the token from the usual
places (``HF_TOKEN``, ``huggingface-cli login``) work as everywhere else.
Weights are taken as safetensors only, unless ``allow_bin`` (a PyTorch pickle
runs code when loaded: opt in).
"""

from __future__ import annotations

import re
from pathlib import Path

# What a model needs besides its weights: configs, tokenizers, chat templates, index files.
_SMALL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubError(OSError):
    """A Hub id that could not be resolved (unknown, gated, no network and not cached)."""


def resolve(model, *, revision: str | None = None, allow_bin: bool = False) -> Path:
    """``model`` as a local folder: itself if it is one, else the snapshot of the
    Hub repository it names (``org/name``), downloaded into or read from the
    standard cache. Raises ``FileNotFoundError`` for a path that exists nowhere
    and is no Hub id, ``HubError`` naming the id and what went wrong otherwise."""
    path = Path(model).expanduser()
    if path.exists() or not _HUB_ID.match(str(model)):
        if not path.exists():
            raise FileNotFoundError(f"{model}: no such folder, and not a Hugging Face Hub id (org/name)")
        return path
    from huggingface_hub import snapshot_download  # only where a Hub id is given
    from huggingface_hub import errors

    patterns = _SMALL_FILES + ["*.safetensors"] + (["*.bin"] if allow_bin else [])
    try:
        return Path(snapshot_download(str(model), revision=revision, allow_patterns=patterns))
    except errors.RepositoryNotFoundError as e:
        raise HubError(f"{model}: no such model on the Hugging Face Hub (or it is private: log in with "
                       f"`huggingface-cli login` or set HF_TOKEN)") from e
    except errors.GatedRepoError as e:
        raise HubError(f"{model} is gated on the Hugging Face Hub: accept its terms on huggingface.co, then "
                       f"log in (`huggingface-cli login` or HF_TOKEN)") from e
    except errors.RevisionNotFoundError as e:
        raise HubError(f"{model}: no revision {revision!r} on the Hugging Face Hub") from e
    except errors.LocalEntryNotFoundError as e:
        raise HubError(f"{model} is not in the Hugging Face cache and the Hub cannot be reached (offline, "
                       f"HF_HUB_OFFLINE=1, or no network): download it once with network access, or pass a "
                       f"local folder") from e
    except (errors.HfHubHTTPError, OSError) as e:
        raise HubError(f"{model}: the Hugging Face Hub could not be reached ({type(e).__name__}: {e})") from e
