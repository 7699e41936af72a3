"""Test doubles that ship with deployer, so that its own tests, benchmarks and users' tests can
run the daemon's logic without a Docker engine or an etcd cluster."""
