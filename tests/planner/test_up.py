"""`kvmesh up --planner`: the launcher starts the planner (local connector) beside the pools,
with the targets given on the command line; the planner's own parser accepts what it is given."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvmesh import cli
from kvmesh.config import PlannerSettings, add_settings_arguments, settings_from_namespace
from kvmesh.launcher import LocalStack, ServiceChild, StackOptions


def _recorded(argv: list[str], monkeypatch) -> list[tuple[str, list[str]]]:
    started: list[tuple[str, list[str]]] = []

    def record(options: StackOptions) -> int:
        stack = LocalStack(options)

        def spawn(name: str, instance_id: str, module: str, args: list[str], env=None) -> None:
            started.append((module, args))
            stack.children.append(ServiceChild(name, instance_id, None, Path(f"{name}.log")))

        stack.spawn = spawn
        stack.start_services()
        return 0

    monkeypatch.setattr(cli, "run_stack", record)
    assert cli.main(argv) == 0
    return started


def test_up_with_planner_starts_it_with_the_local_connector_and_the_targets(monkeypatch):
    started = _recorded(["up", "--prefill", "2", "--decode", "3", "--engine", "mock", "--planner",
                         "--ttft-p90-ms", "1500", "--itl-p90-ms", "80"], monkeypatch)  # fmt: skip
    modules = [module for module, _ in started]
    # Mock workers run several to a process (`--mock-fleet-size`): count the workers, not the processes.
    fleets = [int(args[args.index("--fleet-size") + 1]) for module, args in started
              if module == "services.worker.mock_fleet"]  # fmt: skip
    assert modules.count("services.worker.server") + sum(fleets) == 5 and "planner.server" in modules
    args = next(args for module, args in started if module == "planner.server")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, PlannerSettings)
    settings = settings_from_namespace(PlannerSettings, parser.parse_args(args), env={})
    assert (settings.connector, settings.worker_engine, settings.ttft_p90_ms, settings.itl_p90_ms) == (
        "local", "mock", 1500.0, 80.0)
    assert settings.max_workers == 5 and not settings.dry_run


def test_up_without_planner_starts_none(monkeypatch):
    started = _recorded(["up", "--prefill", "1", "--decode", "1"], monkeypatch)
    assert "planner.server" not in [module for module, _ in started]


def test_planner_needs_disaggregated_pools():
    with pytest.raises(ValueError, match="--prefill N --decode M"):
        StackOptions(workers=2, planner=True)


@pytest.mark.parametrize("bad", [{"connector": "ssh"}, {"min_workers": 1}, {"min_workers": 5, "max_workers": 4},
                                 {"hysteresis": 1.0}, {"ttft_p90_ms": 0}])  # fmt: skip
def test_planner_settings_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        PlannerSettings(**bad)
