import asyncio

import uvloop


def pytest_asyncio_loop_factories(config, item):
    """The product runs on uvloop, so every async test does; the core end-to-end
    tests (modules named *_e2e) also run on plain asyncio, as a check that nothing
    depends on one loop's quirks. The hostile-input, security, OPC UA, MQTT, Sparkplug and energy
    tests run on uvloop only, to keep the suite within its time budget (the asyncio runs of the
    bus and Modbus TCP paths are where a loop's quirks would show: timers, readers, transports)."""
    factories = {"uvloop": uvloop.new_event_loop}
    name = item.module.__name__ if item.module is not None else ""
    if name.endswith("_e2e") and not any(part in name for part in ("opcua", "mqtt", "sparkplug", "energy")):
        factories["asyncio"] = asyncio.new_event_loop
    return factories
