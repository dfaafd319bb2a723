"""What comes from the Hugging Face hub, and whether the hub can be reached, asked quickly, before anything is
downloaded from it."""
import functools
import os

from errors import RunError


def looks_like_path(name):
    """Whether a dataset or model name is a local path (read where it is) rather than a hub id."""
    return name.startswith((os.sep, ".", "~")) or os.path.exists(name)


@functools.cache  # asked once a run, for the dataset and the model alike
def unreachable_reason(timeout_seconds=5):
    """Why the hub cannot be reached from here, or None. Not asked with HF_HUB_OFFLINE set, where the libraries
    read the local Hugging Face cache instead."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return None
    import requests
    try:
        requests.head(constants.ENDPOINT, timeout=timeout_seconds)
    except requests.RequestException as error:
        return f"the Hugging Face hub at {constants.ENDPOINT} cannot be reached ({type(error).__name__})"
    return None


def check_reachable(kind, name, flag):
    """Stops with one line when `name`, the hub id of the `kind` of thing the `flag` names (not a local path, which
    is read where it is), must come from the hub and cannot: the libraries would retry for half a minute, a warning
    each time, before failing."""
    reason = not looks_like_path(name) and unreachable_reason()
    if reason:
        raise RunError(f"cannot download {kind} '{name}': {reason}; pass a local copy ({flag} /path/to/it), or set "
                       "HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache")
