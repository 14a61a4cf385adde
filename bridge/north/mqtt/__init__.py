"""The MQTT side: Sparkplug B and JSON topics towards a broker, with an on-disk store-and-forward queue."""
