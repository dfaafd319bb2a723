"""Whether the Hugging Face hub can be reached, asked once, quickly, before anything is downloaded from it."""
from errors import RunError


def check_reachable(downloads, timeout_seconds=5):
    """Stops with one line when `downloads` (what must come from the hub, such as "dataset 'beans'") cannot: the
    libraries would retry for half a minute, a warning each time, before failing. With HF_HUB_OFFLINE set they read
    the local Hugging Face cache instead, and the hub is not asked."""
    from huggingface_hub import constants
    if not downloads or constants.HF_HUB_OFFLINE:
        return
    import requests
    try:
        requests.head(constants.ENDPOINT, timeout=timeout_seconds)
    except requests.RequestException as error:
        raise RunError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({type(error).__name__}) to "
                       f"download {' and '.join(downloads)}; pass local copies (--dataset, --model_name_or_path), or "
                       "set HF_HUB_OFFLINE=1 to use copies already in the Hugging Face cache") from None
