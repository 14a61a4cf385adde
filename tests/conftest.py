import asyncio

import uvloop


def pytest_asyncio_loop_factories(config, item):
    """The product runs on uvloop, so every async test does; the core end-to-end
    tests (modules named *_e2e) also run on plain asyncio, as a check that nothing
    depends on one loop's quirks. The hostile-input, security and MQTT tests run on
    uvloop only, to keep the suite within its time budget."""
    factories = {"uvloop": uvloop.new_event_loop}
    if item.module is not None and item.module.__name__.endswith("_e2e") and "mqtt" not in item.module.__name__:
        factories["asyncio"] = asyncio.new_event_loop
    return factories
