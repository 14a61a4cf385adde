"""modbus-bridge: Modbus RTU meters served over Modbus TCP and OPC UA."""

__version__ = "0.1.0"
