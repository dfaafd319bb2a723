"""Whether the Hugging Face hub can be reached, asked once, quickly, before anything is downloaded from it."""
from errors import RunError


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


def check_reachable(downloads):
    """Stops with one line when `downloads` (what must come from the hub, such as "dataset 'beans'") cannot: the
    libraries would retry for half a minute, a warning each time, before failing."""
    reason = downloads and unreachable_reason()
    if reason:
        raise RunError(f"cannot download {' and '.join(downloads)}: {reason}; pass local copies (--dataset, "
                       "--model_name_or_path), or set HF_HUB_OFFLINE=1 to use copies already in the Hugging Face "
                       "cache")
