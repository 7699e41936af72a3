"""Fixtures: the real stack (private dockerd, local registry, etcd) lives in tests/stack/."""

pytest_plugins = [
    "tests.stack.docker_stack",
    "tests.stack.etcd_stack",
]
