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
