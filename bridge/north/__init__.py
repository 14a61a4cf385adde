"""The sides clients talk to: Modbus TCP, OPC UA, HTTP and metrics."""
