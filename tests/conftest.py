"""Every test runs on CPU with 8 fake devices, so sharding is exercised without hardware."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One XLA compilation cache for the session, inherited by the subprocesses tests start (CLI runs): the
# same train step compiled again (a resumed run, a second train() call) loads instead of recompiling.
# A fresh directory per session, removed at exit, so timings and results never depend on an old cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="llmjax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# No test may write into the repository (outputs go under tmp_path). Every file git does not track (ignored
# ones included, e.g. runs/) is listed with its modification time before and after the session; a file that
# appears or changes fails the session. Bytecode caches are the interpreter's, not a test's.
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_CACHES = ("__pycache__", ".pytest_cache")


def _untracked_files() -> dict[str, int] | None:
    try:
        listed = subprocess.run(["git", "ls-files", "--others", "-z"], cwd=REPO, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (e.g. an installed sdist): nothing to guard
    files = {}
    for name in listed.stdout.decode().split("\0"):
        if name and not any(part in _CACHES for part in Path(name).parts):
            try:
                files[name] = (REPO / name).lstat().st_mtime_ns
            except FileNotFoundError:
                pass
    return files


@pytest.fixture(scope="session", autouse=True)
def _no_test_writes_into_the_repository():
    before = _untracked_files()
    yield
    after = _untracked_files()
    if before is None or after is None:
        return
    written = sorted(name for name, mtime in after.items() if before.get(name) != mtime)
    assert not written, f"tests wrote into the repository (use tmp_path): {written[:10]}"


# ---------------------------------------------------------------------------------------------------------
# Every compiled program keeps its machine code mapped until JAX's caches drop it: ~200 memory maps per test
# here, and Linux's default limit of 65,530 maps per process made XLA's CPU compiler segfault about 790 tests
# into the session (tests/test_generate.py). Dropping the caches after each test module keeps the count at one
# module's worth; the on-disk compilation cache above still saves the recompiles.
@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs_after_each_module():
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
