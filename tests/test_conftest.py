"""Where the tests find their data: on a fresh clone with neither ../shared nor BEANS_DIR / MODEL_DIR, and no way
to download them."""
import os
import shutil
import subprocess
import sys

from conftest import MISSING, ROOT


def test_offline_clone_without_the_test_data_stops_with_one_line_saying_why_and_what_to_set(tmp_path):
    clone = tmp_path / "clone"  # no ../shared beside it
    (clone / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", clone / "tests")
    for name in ("pytest.ini", "hub.py", "errors.py"):
        shutil.copy(ROOT / name, clone)
    (clone / "tests" / "test_anything.py").write_text("def test_anything():\n    pass\n")
    env = {name: value for name, value in os.environ.items() if name not in ("BEANS_DIR", "MODEL_DIR")}
    env = {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "TEST_DATA_CACHE": str(tmp_path / "cache")}  # refuses
    env.pop("HF_HUB_OFFLINE", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=clone, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode != 0
    assert (run.stdout + run.stderr).strip().splitlines() == [
        "error: cannot download beans: the Hugging Face hub at http://127.0.0.1:9 cannot be reached (ConnectionError); "
        f"{MISSING}"]
