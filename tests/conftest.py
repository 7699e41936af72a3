"""Fixtures: the real stack (private dockerd, local registry, etcd) lives in tests/stack/."""

from hypothesis import HealthCheck, settings

pytest_plugins = [
    "tests.stack.docker_stack",
    "tests.stack.etcd_stack",
]

# Property tests check behaviour, not speed: on a loaded 2-core machine a single example can
# take longer than hypothesis's default 200 ms deadline.
settings.register_profile(
    "deployer", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("deployer")
