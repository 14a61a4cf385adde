"""The OPC UA server: address space, live values, security."""
