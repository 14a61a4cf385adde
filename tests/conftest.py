import asyncio

import uvloop


def pytest_asyncio_loop_factories(config, item):
    """The product runs on uvloop, so every async test does; the end-to-end
    tests also run on plain asyncio, since pymodbus upstream tests neither."""
    factories = {"uvloop": uvloop.new_event_loop}
    if item.module is not None and item.module.__name__.endswith("_e2e"):
        factories["asyncio"] = asyncio.new_event_loop
    return factories
