"""Loads the cluster plugin for the harness's own tests, unless a parent conftest already has."""

PLUGIN = "tests.cluster.fixtures"


def pytest_configure(config):
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)
