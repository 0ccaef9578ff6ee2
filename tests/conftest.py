"""Shared fixtures: real etcd and Redis on free ports, the real model loaded once per session."""

pytest_plugins = ["tests.fixtures.stores", "tests.fixtures.model", "tests.fixtures.mesh"]
