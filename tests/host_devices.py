"""XLA_FLAGS for test subprocesses that need several host devices."""

import os


def host_devices_flags(count: int) -> str:
    """XLA_FLAGS giving `count` CPU devices, keeping the flags already set (the suite's, tests/conftest.py)."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
