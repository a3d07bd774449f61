"""Simulated PLCs: a process model of plant assets served over Modbus, OPC UA and MQTT."""
