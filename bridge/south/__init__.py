"""The serial side: links, the RTU master, one segment task per port, commissioning, the simulator."""
